"""One module per training method, each implementing :class:`appliance.training.protocol.Recipe`."""
