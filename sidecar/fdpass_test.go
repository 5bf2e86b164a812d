package sidecar

import (
	"fmt"
	"net"
	"os"
	"syscall"
	"testing"
)

// More descriptors than one message may carry arrive in batches, in the
// order sent, each still the same open file.
func TestDescriptorsCrossInBatches(t *testing.T) {
	pair, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	ends := make([]*net.UnixConn, 2)
	for i, fd := range pair {
		f := os.NewFile(uintptr(fd), "pair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		ends[i] = c.(*net.UnixConn)
		defer c.Close()
	}
	const count = 2*maxFDsPerMessage + 17
	var sent []int
	for i := range count {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(w, "pipe %d", i)
		w.Close()
		defer r.Close()
		fd, err := rawFD(r)
		if err != nil {
			t.Fatal(err)
		}
		sent = append(sent, fd)
	}
	done := make(chan error, 1)
	go func() { done <- sendFDs(ends[0], sent) }()
	got, err := receiveFDs(ends[1], count)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for i, fd := range got {
		f := os.NewFile(uintptr(fd), "received")
		buf := make([]byte, 32)
		n, _ := f.Read(buf)
		f.Close()
		if want := fmt.Sprintf("pipe %d", i); string(buf[:n]) != want {
			t.Fatalf("descriptor %d reads %q, want %q", i, buf[:n], want)
		}
	}
}
