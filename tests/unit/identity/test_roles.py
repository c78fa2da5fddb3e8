import pytest

from appliance.errors import InvalidRequestError
from appliance.identity.roles import ROLE_PERMISSIONS, Permission, Role, parse_role, role_allows


def test_matrix_covers_every_permission_and_only_admin_and_auditor_read_the_audit_log():
    assert set(ROLE_PERMISSIONS) == set(Permission)
    assert {r for r in Role if role_allows(r, Permission.AUDIT_READ)} == {Role.ADMIN, Role.AUDITOR}
    assert not role_allows(Role.CONSUMER, Permission.FILES_WRITE)
    assert not role_allows(Role.AUDITOR, Permission.FILES_CONTENT)


def test_parse_role_names_the_choices():
    assert parse_role("data-owner") is Role.DATA_OWNER
    with pytest.raises(InvalidRequestError, match="`role` must be one of admin, data-owner.*got 'root'"):
        parse_role("root")
