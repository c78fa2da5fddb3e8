import base64

from appliance.identity import tokens


def test_minted_tokens_carry_256_random_bits_and_only_a_hash_is_kept():
    t = tokens.mint()
    token_id, secret = tokens.parse(t.value)
    assert token_id == t.token_id
    assert len(base64.urlsafe_b64decode(secret + "=")) == 32
    assert t.secret_hash == tokens.hash_secret(secret) and secret not in t.secret_hash
    assert tokens.secret_matches(secret, t.secret_hash)
    assert not tokens.secret_matches(secret[:-1] + ("A" if secret[-1] != "A" else "B"), t.secret_hash)
    assert tokens.mint().value != t.value


def test_malformed_values_do_not_parse():
    good = tokens.mint().value
    for bad in ["", "apl_", good[:-1], good + "x", good.replace("apl_", "sk-"), "Bearer " + good, good.upper()]:
        assert tokens.parse(bad) is None, bad


def test_token_pattern_finds_tokens_in_text():
    v = tokens.mint().value
    assert tokens.TOKEN_PATTERN.search(f"header was {v}!")
