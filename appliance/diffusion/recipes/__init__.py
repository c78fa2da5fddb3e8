"""One module per image training method, each implementing :class:`appliance.diffusion.protocol.Recipe`."""
