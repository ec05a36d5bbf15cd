"""The names of the certificate checks, one asset check each of `certificates/inventory`, with what
each one asserts (kept apart so that naming them imports no TLS or x509 code)."""

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
CHECK_DESCRIPTIONS = {
    CHECK_EXPIRY: "Every certificate is inside its validity window: past its notBefore, and more than "
                  "renew_before_days (else WARN) and fail_below_days (else ERROR) before its notAfter.",
    CHECK_SERVED_IS_STORED: "Each endpoint serves the certificate the cluster stores for its host, and "
                            "cert-manager's status agrees with the certificate in its Secret.",
    CHECK_SANS_COVER_HOST: "Each certificate names the host it is served for and the names its Certificate asks for.",
    CHECK_CHAIN_VERIFIES: "Each chain builds a path to a trust root (the system store plus OPS_TRUST_ROOTS).",
    CHECK_KEY_POLICY: "Each key is RSA of 2048 bits or more, or ECDSA P-256, P-384 or P-521.",
    CHECK_ENDPOINT_REACHABLE: "Each endpoint of certificates.endpoints completes a TLS handshake.",
    CHECK_ISSUANCE: "Each cert-manager Certificate has its Secret, is Ready and has no failed issuance attempt.",
}
