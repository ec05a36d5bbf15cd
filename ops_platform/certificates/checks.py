"""The names of the certificate checks: one asset check each (kept apart so that naming
them imports no TLS or x509 code)."""

CHECK_EXPIRY = "expiry"
CHECK_SERVED_IS_STORED = "served_is_stored"
CHECK_SANS_COVER_HOST = "sans_cover_host"
CHECK_CHAIN_VERIFIES = "chain_verifies"
CHECK_KEY_POLICY = "key_policy"
CHECK_ENDPOINT_REACHABLE = "endpoint_reachable"
CHECK_ISSUANCE = "issuance"
CHECKS = (
    CHECK_EXPIRY,
    CHECK_SERVED_IS_STORED,
    CHECK_SANS_COVER_HOST,
    CHECK_CHAIN_VERIFIES,
    CHECK_KEY_POLICY,
    CHECK_ENDPOINT_REACHABLE,
    CHECK_ISSUANCE,
)
