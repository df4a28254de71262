"""One module per change to SimpleTuner. Each says what upstream does, what it changes and why, names the
SimpleTuner release it was checked against, and refuses to apply to any other."""
