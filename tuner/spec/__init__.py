"""What the user wrote, typed and checked once before any work: the Workspace, the training config,
presets, output targets and credentials, and the job plan. Imports no stage."""
