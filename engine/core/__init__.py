"""The run's spine: config, events, run directories, control channel, exit codes, text safety, quiet output."""
