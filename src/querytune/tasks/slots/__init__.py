"""Slot tagging of queries (BIO token classification) and joint intent + slots (JointBERT)."""
