"""What every stage shares: the record schema (records), tokens and log-probs (sequences), run folders
(rundir) and the console (logs). Imports nothing above it."""
