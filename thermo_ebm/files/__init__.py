"""What goes to disk: checkpoints (`checkpoint`), HDF5 results files (`results`), atomic writes and locks
(`fileio`)."""
