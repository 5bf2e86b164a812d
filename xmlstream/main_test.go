package xmlstream

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine outlives them: every
// connection, reader and writer the code starts must end with it.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
