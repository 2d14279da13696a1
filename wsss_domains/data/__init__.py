"""Sample loading helpers shared by every loader."""
