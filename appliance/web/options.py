"""Route options (``opt=`` on a handler) that authentication and the OpenAPI description read."""

#: Route option naming the permission a handler needs.
PERMISSION_OPT = "permission"
#: Route option marking a handler as reachable without a token.
PUBLIC_OPT = "exclude_from_auth"
#: Route option marking a portal page: authenticated by session cookie, CSRF-checked.
PORTAL_OPT = "portal"
