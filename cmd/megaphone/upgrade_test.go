package main

import (
	"slices"
	"testing"
)

// A successor gets its parent's arguments without the parent's own
// --takeover, in every spelling the flag package takes.
func TestSuccessorArguments(t *testing.T) {
	for _, tc := range []struct{ in, want []string }{
		{[]string{"--node", "e@h", "--handoff-socket", "/run/h.sock"}, []string{"--node", "e@h", "--handoff-socket", "/run/h.sock"}},
		{[]string{"--takeover", "/run/h.sock", "--node", "e@h"}, []string{"--node", "e@h"}},
		{[]string{"-takeover=/run/h.sock", "--node", "e@h"}, []string{"--node", "e@h"}},
		{[]string{"--node", "e@h", "--takeover=/run/h.sock"}, []string{"--node", "e@h"}},
		{[]string{"--name", "takeover"}, []string{"--name", "takeover"}},
	} {
		if got := withoutTakeover(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("withoutTakeover(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
	env := withoutTakeoverEnv([]string{"HOME=/x", "MEGAPHONE_TAKEOVER=/run/h.sock", "MEGAPHONE_NODE=e@h"})
	if !slices.Equal(env, []string{"HOME=/x", "MEGAPHONE_NODE=e@h"}) {
		t.Errorf("environment %q", env)
	}
}
