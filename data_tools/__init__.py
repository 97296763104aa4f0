"""Datasets: reading a captioned folder for training, and `flux2-lora prepare` (check, fix, caption, bucket).
Imports only the base (common/)."""
