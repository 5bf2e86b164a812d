package harness

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// DistRefusal matches what OTP logs when it rejects something a peer sent
// over the distribution: a handshake without a flag it requires (OTP 26+:
// "cannot handle [\"UNLINK_ID\"]"), a term or control message it cannot
// decode ("corrupted external term", "Invalid distribution message"), or a
// signal it considers malformed (the old UNLINK sent to OTP 26+). The
// connection is usually dropped right after, so a test that only watches
// its own side can miss the reason.
var DistRefusal = regexp.MustCompile(`(?i)cannot handle \[|corrupted (external term|distribution header)|invalid distribution message|malformed (distribution|control|packet|signal)`)

// DistRefusals returns the lines of the node's console output and log files
// in which it refused something a distribution peer sent (see DistRefusal).
// Call it before Stop, which removes a temporary Dir.
func (e *Ejabberd) DistRefusals() []string {
	var found []string
	for _, f := range []string{e.ConsoleLog, e.LogFile, filepath.Join(e.Dir, "logs", "error.log")} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if DistRefusal.MatchString(line) {
				found = append(found, filepath.Base(f)+": "+strings.TrimSpace(line))
			}
		}
	}
	return found
}
