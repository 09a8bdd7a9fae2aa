"""The built-in tasks, one module each, registered in dbench.registry.TASKS (see dbench.task)."""
