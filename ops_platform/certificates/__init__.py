"""Certificate inspection and renewal: plain Python, no Dagster.

- :mod:`.x509_info`: what a certificate says (names, dates, key) and whether
  its chain verifies;
- :mod:`.probe`: the certificate an endpoint actually serves (TLS handshake
  with SNI, bounded in time);
- :mod:`.inventory`: every certificate the platform stores (cert-manager
  Certificates, ``kubernetes.io/tls`` Secrets) or serves, with findings;
- :mod:`.renewal`: re-issuance through cert-manager, as ``cmctl renew`` does,
  followed until the new certificate is served.
"""
