package test

import (
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// soakRound is how long one round of the soak's load lasts: its clients
// log in, chat for a round, log out, and the next round logs in afresh.
const soakRound = time.Minute

// The soak (make soak; skipped unless MEGAPHONE_SOAK_DURATION is set):
// for that long, rounds of mixed load through one sidecar: a Strophe.js
// BOSH swarm (MEGAPHONE_SOAK_SESSIONS users, default 1000) chatting with
// themselves, and @xmpp/client pairs chatting over STARTTLS, direct TLS
// and WebSocket; every round logs everyone in and out again. Each round
// must finish clean (every BOSH user alive and in order, every pair gap-
// free), with as many sessions in ejabberd as clients logged in. At the
// end, once everyone has logged out, the sidecar (heap, RSS, goroutines,
// sockets) and ejabberd (erlang:memory(total), process count) must be
// back within a small margin of where they were after the first round:
// flat, not growing with time.
func TestSoak(t *testing.T) {
	durationSetting := os.Getenv("MEGAPHONE_SOAK_DURATION")
	if durationSetting == "" {
		t.Skip("the soak runs under make soak (MEGAPHONE_SOAK_DURATION)")
	}
	duration, err := time.ParseDuration(durationSetting)
	if err != nil || duration < soakRound {
		t.Fatalf("MEGAPHONE_SOAK_DURATION=%q: a duration of at least %s", durationSetting, soakRound)
	}
	sessions := 1000
	if s := os.Getenv("MEGAPHONE_SOAK_SESSIONS"); s != "" {
		if sessions, err = strconv.Atoi(s); err != nil || sessions < 1 || sessions > 5000 {
			t.Fatalf("MEGAPHONE_SOAK_SESSIONS=%q: 1..5000", s)
		}
	}
	ej := startEjabberd(t, harness.Options{BOSHInactivity: 10 * time.Second})
	eval(t, ej, fmt.Sprintf(`[ok = ejabberd_auth:try_register(<<"user", (integer_to_binary(I))/binary>>, <<"localhost">>, <<"%s">>)
	    || I <- lists:seq(1, %d)], ok`, demoPassword, sessions+6)) // the swarm's, then the pairs'
	baseLeftover := evalInt(t, ej, leftoverExpr)
	rounds := int(duration / soakRound)
	admin := freeAddr(t)
	sc := startStreamSidecar(t, ej, "--admin-addr", admin)
	pid := sc.cmd.Process.Pid

	type figures struct{ heapMiB, rssMiB, goroutines, fds, beamMiB, processes int }
	// The heap in use includes garbage until the next collection, which an
	// idle sidecar runs at least every 2 minutes: the least of it over a
	// window past that is what is live.
	liveHeapMiB := func() int {
		least := -1
		for i := 0; i < 27; i++ {
			heap, _ := strconv.ParseFloat(metricValue(scrapeOnce(t, admin), "go_memstats_heap_inuse_bytes"), 64)
			if least < 0 || int(heap) < least {
				least = int(heap)
			}
			time.Sleep(5 * time.Second)
		}
		return least >> 20
	}
	measure := func(round int) figures {
		heapMiB := 0
		if round == 1 || round == rounds {
			heapMiB = liveHeapMiB() // only where it is compared: it takes 2 minutes
		}
		return figures{
			heapMiB: heapMiB, rssMiB: rssKiB(t, pid) >> 10, goroutines: goroutines(t, admin), fds: sc.openFiles(t),
			beamMiB:   evalInt(t, ej, `[erlang:garbage_collect(P) || P <- erlang:processes()], erlang:memory(total)`) >> 20,
			processes: evalInt(t, ej, "erlang:system_info(process_count)"),
		}
	}
	// settled waits until everyone has logged out on both sides.
	settled := func(what string) {
		waitUntil(t, time.Minute, what, func() bool {
			return evalInt(t, ej, "length(ejabberd_sm:dirty_get_sessions_list())") == 0 &&
				evalInt(t, ej, leftoverExpr) == baseLeftover &&
				metricValue(scrapeOnce(t, admin), `megaphone_bosh_in_flight{node="`+ej.Node+`"}`) == "0"
		})
		time.Sleep(5 * time.Second) // the sidecar's closing goroutines finish
	}

	var warm, last figures
	for round := 1; round <= rounds; round++ {
		secs := strconv.Itoa(int(soakRound/time.Second) - 15) // room to log in and out
		swarm := startSwarm(t, sc.url(), "--users", strconv.Itoa(sessions), "--duration", secs,
			"--interval-ms", "5000", "--hung-after", "20", "--concurrency", "50", "--timeout", "300")
		pairs := map[string]*nodeClient{}
		for i, tr := range []struct{ name, service string }{
			{"starttls", "xmpp://" + sc.c2s}, {"tls", "xmpps://" + sc.c2sTLS}, {"websocket", sc.wsURL()},
		} {
			a, b := fmt.Sprint("user", sessions+2*i+1), fmt.Sprint("user", sessions+2*i+2)
			pairs[tr.name] = xmppChat(t, tr.service, "--mode", "live", "--duration", secs, "--interval-ms", "100",
				"--a", a, "--b", b, "--timeout", "300")
		}
		loggedIn := swarm.waitReady(t)["logged_in"]
		for _, p := range pairs {
			p.waitReady(t)
		}
		inEjabberd := evalInt(t, ej, "length(ejabberd_sm:dirty_get_sessions_list())")
		if want := loggedIn + 2*len(pairs); inEjabberd != want {
			t.Errorf("round %d: %d sessions in ejabberd, %d clients logged in through the sidecar", round, inEjabberd, want)
		}
		res := swarm.wait(t, soakRound+5*time.Minute)
		if res.Alive != sessions || res.Hung != 0 || res.OutOfOrder != 0 || len(res.Terminated) != 0 {
			t.Errorf("round %d: BOSH swarm %+v", round, res)
		}
		for name, p := range pairs {
			if r := p.wait(t, 5*time.Minute); !r.OK {
				t.Errorf("round %d: %s pair: %+v", round, name, r)
			}
		}
		settled(fmt.Sprintf("round %d: everyone logged out", round))
		f := measure(round)
		heap := "" // measured in the first and last rounds only
		if f.heapMiB > 0 {
			heap = fmt.Sprintf("live heap %d MiB, ", f.heapMiB)
		}
		t.Logf("round %d/%d: sidecar %sRSS %d MiB, %d goroutines, %d fds; beam %d MiB, %d processes",
			round, rounds, heap, f.rssMiB, f.goroutines, f.fds, f.beamMiB, f.processes)
		if round == 1 {
			warm = f
		}
		last = f
		if t.Failed() {
			t.Fatalf("stopping the soak after round %d", round)
		}
	}
	end := last
	// Connections the clients closed last may still be closing.
	for i := 0; i < 12 && (end.fds > warm.fds || end.goroutines > warm.goroutines+3); i++ {
		time.Sleep(5 * time.Second)
		end.fds, end.goroutines = sc.openFiles(t), goroutines(t, admin)
	}
	within := func(what string, got, base, margin int) {
		if got > base+margin {
			t.Errorf("%s: %d after the soak, %d after its first round (margin %d)", what, got, base, margin)
		}
	}
	within("sidecar heap in use (MiB)", end.heapMiB, warm.heapMiB, 8+warm.heapMiB/5)
	within("sidecar RSS (MiB)", end.rssMiB, warm.rssMiB, 16+warm.rssMiB/2)
	within("sidecar goroutines", end.goroutines, warm.goroutines, 3)
	within("sidecar open files", end.fds, warm.fds, 0)
	within("ejabberd memory (MiB)", end.beamMiB, warm.beamMiB, 16+warm.beamMiB/10)
	within("ejabberd processes", end.processes, warm.processes, 5)
	if strings.Contains(sc.logs(), "panic") {
		t.Errorf("the sidecar panicked:\n%s", tail(sc.logs(), 40))
	}
}

// metricValue returns a sample's value from Prometheus text ("" if absent).
func metricValue(text, series string) string {
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindStringSubmatch(text)
	if m == nil {
		return ""
	}
	return m[1]
}
