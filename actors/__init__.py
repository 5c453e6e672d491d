"""Ray actors: thin shells that hold state (a loaded model, the job table) and call `cluster/`."""

ORCHESTRATOR_NAME = "lipsync-orchestrator"
