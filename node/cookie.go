package node

import (
	"errors"
	"fmt"
	"os"
	"strings"
)

// ReadCookieFile reads the distribution cookie from path. The cookie is the
// key to the whole ejabberd cluster, so it is only ever read from a file
// (never argv, where any local user can see it) and the file must not be
// readable by other users.
func ReadCookieFile(path string) (string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("cookie file: %w", err)
	}
	if fi.Mode().Perm()&0o004 != 0 {
		return "", fmt.Errorf("cookie file %s is readable by every user (mode %04o); run: chmod 400 %s",
			path, fi.Mode().Perm(), path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("cookie file: %w", err)
	}
	cookie := strings.TrimSpace(string(b))
	if cookie == "" {
		return "", errors.New("cookie file " + path + " is empty")
	}
	return cookie, nil
}
