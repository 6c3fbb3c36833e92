"""The fine-tuning side: one module per training type, sharing common.py and data.py."""
