"""Code that both the controller and the agent run: what one signs, the other checks."""
