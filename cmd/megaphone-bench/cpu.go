package main

import (
	"os"
	"strconv"
	"strings"
	"time"
)

// What the saturated chat costs in CPU, per message delivered: where the
// box's two cores go. Saturated chat is CPU-bound, so these, not the
// messages a second alone, say what a path costs and where to cut.

// cpuSample is the CPU time used so far by the processes of one path and
// by the whole box.
type cpuSample struct {
	beam, sidecar, clients time.Duration
	boxBusy, boxTotal      int64 // jiffies, all CPUs (/proc/stat)
}

// sampleCPU reads beam's, the sidecar's (0: none) and this process's (the
// clients') CPU time, and the box's.
func sampleCPU(beamPid, sidecarPid int) cpuSample {
	s := cpuSample{beam: processCPU(strconv.Itoa(beamPid)), clients: processCPU("self")}
	if sidecarPid != 0 {
		s.sidecar = processCPU(strconv.Itoa(sidecarPid))
	}
	s.boxBusy, s.boxTotal = boxCPU()
	return s
}

// clockTicks is the kernel's USER_HZ, the unit of /proc's CPU times: 100
// on every Linux architecture Go runs on.
const clockTicks = 100

// processCPU is a process's user + system time (/proc/<pid>/stat fields
// 14 and 15); 0 if it cannot be read.
func processCPU(pid string) time.Duration {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return 0
	}
	// The command name (field 2) may hold spaces: count from after it.
	_, rest, ok := strings.Cut(string(b), ") ")
	f := strings.Fields(rest)
	if !ok || len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * time.Second / clockTicks
}

// boxCPU is the box's busy and total jiffies over all CPUs (/proc/stat's
// first line; idle and iowait are not busy).
func boxCPU() (busy, total int64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	for i, f := range strings.Fields(line)[1:] {
		v, _ := strconv.ParseInt(f, 10, 64)
		total += v
		if i != 3 && i != 4 { // idle, iowait
			busy += v
		}
	}
	return busy, total
}

// chatCPU is the CPU one path spent per message in saturated chat.
type chatCPU struct {
	beam, sidecar, clients time.Duration // per message
	boxBusy                float64       // share of all cores busy, 0..1
}

// perMessage turns two samples around n messages into chatCPU.
func perMessage(before, after cpuSample, n int64) chatCPU {
	if n <= 0 {
		return chatCPU{}
	}
	per := func(a, b time.Duration) time.Duration { return (b - a) / time.Duration(n) }
	r := chatCPU{beam: per(before.beam, after.beam), sidecar: per(before.sidecar, after.sidecar),
		clients: per(before.clients, after.clients)}
	if dt := after.boxTotal - before.boxTotal; dt > 0 {
		r.boxBusy = float64(after.boxBusy-before.boxBusy) / float64(dt)
	}
	return r
}

// server is what the server side spends per message: beam and sidecar.
func (c chatCPU) server() time.Duration { return c.beam + c.sidecar }

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
