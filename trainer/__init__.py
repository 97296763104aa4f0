"""The training recipe and its parts. Imports the model layer (inference/) and data_tools/, never the reverse."""
