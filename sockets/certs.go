package sockets

import (
	"crypto/tls"
	"errors"
	"sync/atomic"
)

// Certificates holds the server certificate, reloadable while connections
// are served: new handshakes use the new one, live ones keep theirs.
type Certificates struct {
	certFile, keyFile string
	current           atomic.Pointer[tls.Certificate]
}

// LoadCertificates reads a PEM certificate chain and its key.
func LoadCertificates(certFile, keyFile string) (*Certificates, error) {
	c := &Certificates{certFile: certFile, keyFile: keyFile}
	return c, c.Reload()
}

// Reload reads the files again; on error the old certificate stays.
func (c *Certificates) Reload() error {
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return err
	}
	c.current.Store(&cert)
	return nil
}

// TLSConfig returns a server configuration that always uses the current
// certificate.
func (c *Certificates) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			if cert := c.current.Load(); cert != nil {
				return cert, nil
			}
			return nil, errors.New("no certificate loaded")
		},
	}
}
