package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/megaphone-im/megaphone/cmd/megaphone-bench/loadgen"
)

// The scale run's load generator is this binary again, one process per
// ~19,000 sessions (the open-files limit is 20,000 per process), each
// dialing from its own loopback source addresses. The parent drives it
// over stdin/stdout, one command a line, one answer a line:
//
//	login FIRST COUNT MAXFAIL -> done OK FAILED RETRIED MILLIS [first error]
//	close                     -> closed N
//
// login logs users bFIRST..bFIRST+COUNT-1 in and keeps their sessions; it
// stops taking new users once MAXFAIL have failed (a server that stopped
// answering costs a login timeout each). close logs every session out.
// End of input logs everything out and exits: a parent that dies takes
// its workers' sessions with it.

// scaleWorkerCommand is the first argument that runs this binary as a
// scale worker.
const scaleWorkerCommand = "scale-worker"

// scaleLoginAttempts: a failed login is tried once more, then counted.
const scaleLoginAttempts = 2

type scaleWorker struct {
	target   loadgen.Target
	dialer   *loadgen.Dialer
	inflight int

	mu       sync.Mutex
	sessions []loadgen.Session
}

func scaleWorkerMain(args []string) int {
	fs := flag.NewFlagSet(scaleWorkerCommand, flag.ContinueOnError)
	addr := fs.String("addr", "", "where the sessions log in (host:port, plain XMPP over TCP)")
	domain := fs.String("domain", "localhost", "XMPP domain")
	first := fs.Int("source-first", 10, "first loopback source address: 127.0.0.N")
	sources := fs.Int("sources", 2, "loopback source addresses")
	inflight := fs.Int("inflight", 8, "logins in flight")
	timeout := fs.Duration("login-timeout", 30*time.Second, "bound on one login")
	if err := fs.Parse(args); err != nil || *addr == "" {
		fmt.Fprintln(os.Stderr, "scale-worker: -addr is required")
		return 2
	}
	raiseOpenFiles()
	w := &scaleWorker{
		target:   loadgen.Target{Kind: loadgen.TCP, Addr: *addr, Domain: *domain, Timeout: *timeout},
		dialer:   loadgen.NewDialerFrom(*first, *sources),
		inflight: max(1, *inflight),
	}
	defer w.closeAll()
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() { // ends with the parent's input
		f := strings.Fields(in.Text())
		var answer string
		switch {
		case len(f) == 4 && f[0] == "login":
			n := make([]int, 3)
			var err error
			for i := range n {
				if n[i], err = strconv.Atoi(f[i+1]); err != nil {
					break
				}
			}
			if err != nil {
				answer = "error bad login command"
				break
			}
			answer = w.login(n[0], n[1], n[2])
		case len(f) == 1 && f[0] == "close":
			answer = fmt.Sprintf("closed %d", w.closeAll())
		default:
			answer = "error unknown command"
		}
		if _, err := fmt.Println(answer); err != nil {
			return 1
		}
	}
	return 0
}

// login logs users in, w.inflight at a time, and answers with the counts.
func (w *scaleWorker) login(first, count, maxFail int) string {
	var next, ok, failed, retried atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	start := time.Now()
	for g := 0; g < w.inflight; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for failed.Load() < int64(maxFail) {
				i := int(next.Add(1)) - 1
				if i >= count {
					return
				}
				user := "b" + strconv.Itoa(first+i)
				var s loadgen.Session
				var err error
				for attempt := 1; attempt <= scaleLoginAttempts; attempt++ {
					ctx, cancel := context.WithTimeout(context.Background(), w.target.Timeout)
					s, err = loadgen.Login(ctx, w.dialer, w.target, user, "pw")
					cancel()
					if err == nil {
						break
					}
					if attempt < scaleLoginAttempts {
						retried.Add(1)
					}
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				ok.Add(1)
				w.mu.Lock()
				w.sessions = append(w.sessions, s)
				w.mu.Unlock()
			}
		}()
	}
	wg.Wait()
	msg, _ := firstErr.Load().(string)
	msg = strings.Join(strings.Fields(msg), " ") // one line
	return fmt.Sprintf("done %d %d %d %d %s", ok.Load(), failed.Load(), retried.Load(), time.Since(start).Milliseconds(), msg)
}

// closeAll logs every session out and says how many there were.
func (w *scaleWorker) closeAll() int {
	w.mu.Lock()
	sessions := w.sessions
	w.sessions = nil
	w.mu.Unlock()
	closeAll(sessions)
	return len(sessions)
}
