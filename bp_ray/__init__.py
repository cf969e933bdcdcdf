"""bp-ray."""
