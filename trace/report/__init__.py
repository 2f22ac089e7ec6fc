"""`trace-tables`' steps: collect run folders into jobs, aggregate them into rows with seed statistics and
paired comparisons, render tables and plots' data, draw the plots, log to wandb."""
