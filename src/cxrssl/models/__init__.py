"""Network builders shared by pretraining, linear evaluation and detection."""
