"""Before a run: the memory estimate, the fit planner, the weight-streaming floor and host RAM."""
