#!/bin/sh
# Run a command trusting the extra CA bundle handed to the build as a BuildKit secret
# (corporate TLS proxies). The bundle is mounted only for the RUN that needs it and is
# never written to a layer. Without the secret, the command runs unchanged.
if [ -f /run/secrets/ca_bundle ]; then
    export PIP_CERT=/run/secrets/ca_bundle SSL_CERT_FILE=/run/secrets/ca_bundle \
        REQUESTS_CA_BUNDLE=/run/secrets/ca_bundle GIT_SSL_CAINFO=/run/secrets/ca_bundle \
        CURL_CA_BUNDLE=/run/secrets/ca_bundle
fi
# The package indexes' credentials (a mirror's user:token) come the same way, as the secret
# index_auth: a netrc file that pip reads through NETRC for this one command. The Dockerfile and
# its ENV name the mirror without them.
if [ -f /run/secrets/index_auth ]; then
    export NETRC=/run/secrets/index_auth
fi
exec "$@"
