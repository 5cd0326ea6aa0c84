"""Datasets: MedMNIST files, the embedded synthetic set, transforms and the datamodule."""
