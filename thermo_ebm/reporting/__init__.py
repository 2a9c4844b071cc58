"""What a user reads: `show`'s tables (`report`) and `plot`'s figures (`plot`), from results files."""
