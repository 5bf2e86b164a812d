package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

var kindNames = map[transport]string{
	transportTCP:       "TCP c2s",
	transportTLS:       "TLS c2s",
	transportWebSocket: "WebSocket",
	transportBOSH:      "BOSH",
	transportBOSHEdge:  "BOSH (edge)",
}

func renderReport(c config, idle []idleResult, chats []chatResult, failures []string, took time.Duration) string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	w("## Idle sessions (%s)\n\n", time.Now().UTC().Format("2006-01-02 15:04 MST"))
	w("Per transport and N: N sessions log in through a fresh sidecar, idle %s and are\n", c.idle)
	w("measured; then N log in to ejabberd's own listener of the same transport. Each side has a\n")
	w("fresh private ejabberd node of the same configuration. KiB per session (growth over the\n")
	w("idle baseline / N). Total = beam RSS + sidecar RSS + kernel. beam RSS is read once\n")
	w("mseg_alloc has unmapped the carriers the forced GC emptied; its peak is the highest\n")
	w("while the sessions logged in and idled (the shim sweeps every %s). BOSH through Megaphone\n", c.sweep)
	w("is relayed to ejabberd_bosh (--bosh-mode relay); BOSH (edge) is the sidecar keeping the sessions\n")
	w("(--bosh-mode edge). The native side of both is ejabberd's mod_bosh, measured once: when both\n")
	w("columns run, BOSH (edge)'s native rows repeat BOSH's.\n\n")
	w("| transport | path | N | logins/s | beam RSS | beam RSS peak | Erlang mem | Erlang mem after GC | sidecar RSS | kernel | **total** | Erlang procs | ports |\n")
	w("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range idle {
		rate := fmt.Sprintf("%.0f", r.loginRate)
		if r.retried > 0 {
			rate += fmt.Sprintf(" (%d retried)", r.retried)
		}
		w("| %s | %s | %d | %s | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | **%.1f** | %.2f | %.2f |\n", kindNames[r.kind], pathName(r.megaphone),
			r.n, rate, r.beamRSS, r.beamPeak, r.erlang, r.erlangGC, r.sidecarRSS, r.kernel, r.total(), r.processes, r.ports)
	}
	w("\n### Native vs Megaphone, total KiB per idle session\n\n")
	w("| transport | N | native | Megaphone | Megaphone / native | ejabberd's share through Megaphone (Erlang mem) | login rate Megaphone / native |\n")
	w("|---|---|---|---|---|---|---|\n")
	for _, p := range pairIdle(idle) {
		m, n := p[0], p[1]
		w("| %s | %d | %.1f | %.1f | %.2f | %.1f | %.2f |\n", kindNames[m.kind], m.n, n.total(), m.total(), m.total()/n.total(),
			m.erlang, m.loginRate/n.loginRate)
	}
	if len(chats) > 0 {
		w("\n## 1:1 chat, %d pairs\n\n", chats[0].pairs)
		w("Saturated: each pair keeps one message in flight for %s (send, wait for delivery, send\n", c.chatFor)
		w("the next); latency is send to delivery. Paced: each pair sends %.0f messages/s for %s.\n\n", c.pacedRate, c.chatFor)
		w("| transport | path | logins/s | msgs/s saturated | p50 ms | p99 ms | paced msgs/s | paced p50 ms | paced p99 ms | paced lost |\n")
		w("|---|---|---|---|---|---|---|---|---|---|\n")
		for _, r := range chats {
			w("| %s | %s | %.0f | %.0f | %.2f | %.2f | %.0f | %.2f | %.2f | %d |\n", kindNames[r.kind], pathName(r.megaphone), r.loginRate, r.rate,
				ms(r.p50), ms(r.p99), r.pacedRate, ms(r.pacedP50), ms(r.pacedP99), r.lost)
		}
		w("\n| transport | throughput Megaphone / native | paced p99 Megaphone − native, ms |\n|---|---|---|\n")
		for i := 0; i+1 < len(chats); i += 2 {
			m, n := chats[i], chats[i+1]
			w("| %s | %.2f | %+.2f |\n", kindNames[m.kind], m.rate/n.rate, ms(m.pacedP99)-ms(n.pacedP99))
		}
		w("\nCPU per message delivered, saturated phase, µs (user + system, from /proc): the clients\n")
		w("run on the same two cores, so the server's total per message is what bounds throughput.\n\n")
		w("| transport | path | beam | sidecar | **server total** | clients | box busy |\n|---|---|---|---|---|---|---|\n")
		for _, r := range chats {
			w("| %s | %s | %.1f | %.1f | **%.1f** | %.1f | %.0f%% |\n", kindNames[r.kind], pathName(r.megaphone),
				us(r.cpu.beam), us(r.cpu.sidecar), us(r.cpu.server()), us(r.cpu.clients), 100*r.cpu.boxBusy)
		}
	}
	for _, r := range idle {
		b.WriteString(r.allocators)
	}
	for _, f := range failures {
		w("\n**Failed:** %s\n", f)
	}
	w("\nMachine: %s. Run took %s. Other work (builds, tests of other engineers) may have been\n", machine(), took.Round(time.Second))
	w("running on the machine at the same time: throughput and latency are noisy, memory much less so.\n")
	return b.String()
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// pairIdle matches each Megaphone row with the native row of the same
// transport and N (runCell appends them in that order).
func pairIdle(idle []idleResult) [][2]idleResult {
	var out [][2]idleResult
	for i := 0; i+1 < len(idle); i += 2 {
		out = append(out, [2]idleResult{idle[i], idle[i+1]})
	}
	return out
}

// plot writes the data files, a gnuplot script and the PNGs into dir.
func plot(dir string, idle []idleResult, chats []chatResult) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var mem strings.Builder
	var kinds []transport
	for _, r := range idle {
		if len(kinds) == 0 || kinds[len(kinds)-1] != r.kind {
			kinds = append(kinds, r.kind)
		}
	}
	// memory.dat: one block per transport and path (gnuplot's index).
	var memPlots []string
	block := 0
	for _, k := range kinds {
		for _, megaphone := range []bool{false, true} {
			fmt.Fprintf(&mem, "# %s %s\n", kindNames[k], pathName(megaphone))
			for _, r := range idle {
				if r.kind == k && r.megaphone == megaphone {
					fmt.Fprintf(&mem, "%d %.2f %.2f %.2f %.2f\n", r.n, r.total(), r.beamRSS, r.sidecarRSS, r.kernel)
				}
			}
			mem.WriteString("\n\n")
			dash := 1
			if !megaphone {
				dash = 2
			}
			memPlots = append(memPlots, fmt.Sprintf("'memory.dat' index %d using 1:2 with linespoints lw 2 dt %d lc %d title '%s %s'",
				block, dash, colour(k), kindNames[k], pathName(megaphone)))
			block++
		}
	}
	// memory-split.dat: at the largest N, where each path's total goes.
	var split strings.Builder
	split.WriteString("# label beam sidecar kernel\n")
	for _, p := range pairIdle(idle) {
		if !isLargest(p[0], idle) {
			continue
		}
		for _, r := range []idleResult{p[1], p[0]} {
			fmt.Fprintf(&split, "\"%s\\n%s\" %.2f %.2f %.2f\n", kindNames[r.kind], pathName(r.megaphone), r.beamRSS, r.sidecarRSS, r.kernel)
		}
	}
	var chat strings.Builder
	chat.WriteString("# label native_rate megaphone_rate native_p50 native_p99 megaphone_p50 megaphone_p99 (paced, ms)\n")
	for i := 0; i+1 < len(chats); i += 2 {
		m, n := chats[i], chats[i+1]
		fmt.Fprintf(&chat, "\"%s\" %.1f %.1f %.3f %.3f %.3f %.3f\n", kindNames[m.kind], n.rate, m.rate,
			ms(n.pacedP50), ms(n.pacedP99), ms(m.pacedP50), ms(m.pacedP99))
	}
	files := map[string]string{"memory.dat": mem.String(), "memory-split.dat": split.String(), "chat.dat": chat.String()}
	// autoscale, not [0:*]: at the smoke test's tiny N the baseline's noise
	// can make a per-session figure negative, and gnuplot refuses a plot
	// with every point outside its range.
	script := `set terminal pngcairo size 900,560 font ',11'
set grid ytics
set key outside right top
set output 'memory.png'
set title 'Total memory per idle session (beam RSS + sidecar RSS + kernel), lower is better'
set xlabel 'idle sessions (N)'
set ylabel 'KiB per session'
set autoscale y
plot ` + strings.Join(memPlots, ", \\\n     ") + `
set output 'memory-split.png'
set title 'Where an idle session''s memory goes, at the largest N'
set xlabel ''
set style data histograms
set style histogram rowstacked
set style fill solid 0.8 border -1
set boxwidth 0.7
set xtics rotate by -30 font ',9'
plot 'memory-split.dat' using 2:xtic(1) title 'beam RSS', '' using 3 title 'sidecar RSS', '' using 4 title 'kernel'
set output 'throughput.png'
set title '1:1 chat throughput, one message in flight per pair, higher is better'
set ylabel 'messages/s'
set style histogram clustered gap 1
set xtics norotate font ',11'
plot 'chat.dat' using 2:xtic(1) title 'native', '' using 3 title 'Megaphone'
set output 'latency.png'
set title '1:1 chat latency at a paced rate (send to delivery), lower is better'
set ylabel 'ms'
plot 'chat.dat' using 4:xtic(1) title 'native p50', '' using 6 title 'Megaphone p50', '' using 5 title 'native p99', '' using 7 title 'Megaphone p99'
`
	if len(chats) == 0 {
		script = script[:strings.Index(script, "set output 'throughput.png'")]
	}
	files["plots.gp"] = script
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			return err
		}
	}
	cmd := exec.Command("gnuplot", "plots.gp")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("gnuplot (make bench installs it): %v\n%s", err, out)
	}
	return nil
}

func isLargest(r idleResult, idle []idleResult) bool {
	for _, o := range idle {
		if o.kind == r.kind && o.n > r.n {
			return false
		}
	}
	return true
}

func colour(k transport) int {
	return slices.Index(transports, k) + 1
}
