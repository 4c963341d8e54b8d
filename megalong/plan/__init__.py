"""Choose a parallel layout: memory and step-time estimates, layout enumeration."""
