"""What several tasks share: out-of-scope detection (intent and the joint intent head), the Trainer that skips
unseen eval labels in its loss, and the per-label reports and confusion plots."""
