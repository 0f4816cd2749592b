"""Importers, filters, the leave-one-out split and the dataset loader."""
