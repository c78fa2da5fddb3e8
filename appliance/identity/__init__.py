"""Identity and access: projects, users, roles, tokens, authentication."""
