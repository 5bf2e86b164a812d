package node

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// DistTLSConfig is the client side of a distribution link over TLS, for an
// ejabberd node started with -proto_dist inet_tls: the node's certificate
// must chain to caFile (a private CA: the system's roots would let any
// certificate for the host's name in), and certFile/keyFile, if given, are
// what we present to a node that asks for a client certificate
// (fail_if_no_peer_cert). The host name checked is the host part of the
// ejabberd node's name, as an Erlang node checks it.
func DistTLSConfig(certFile, keyFile, caFile string) (*tls.Config, error) {
	if caFile == "" {
		return nil, errors.New("distribution TLS needs the CA that signs ejabberd's certificate (--dist-tls-ca)")
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("distribution TLS CA: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("distribution TLS CA: no PEM certificate in %s", caFile)
	}
	cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	switch {
	case certFile != "" && keyFile != "":
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("distribution TLS certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	case certFile != "" || keyFile != "":
		return nil, errors.New("distribution TLS: give both --dist-tls-cert and --dist-tls-key, or neither")
	}
	return cfg, nil
}
