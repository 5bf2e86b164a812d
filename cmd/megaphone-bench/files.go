package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/megaphone-im/megaphone/test/harness"
)

// withCert gives c the run's TLS certificate and key, in a temporary
// directory that cleanup removes.
func withCert(c *config, prefix string) (cleanup func(), err error) {
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		return nil, err
	}
	if c.cert, c.key, err = harness.SelfSignedCert(filepath.Join(dir, "tls")); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return func() { os.RemoveAll(dir) }, nil
}

// publish prints the report and, with -out, writes it to that file.
func publish(c config, report string) error {
	fmt.Print(report)
	if c.out == "" {
		return nil
	}
	return os.WriteFile(c.out, []byte(report), 0o644)
}
