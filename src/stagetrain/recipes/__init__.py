"""Built-in tasks whose data stagetrain generates itself (nothing is downloaded)."""
