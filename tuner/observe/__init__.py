"""What a job tells its watchers: events, stage timings, the job summary, the termination message,
loss curves."""
