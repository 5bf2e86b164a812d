package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/megaphone-im/megaphone/test/harness"
)

// The allocator breakdown (-alloc): where beam's RSS goes beyond
// erlang:memory(total). Per alloc_util allocator type, summed over its
// instances: the multiblock carriers beam holds and the blocks in them,
// the singleblock carriers, and the carriers abandoned to the pool; and,
// for the process-heap and binary allocators, how full their carriers are.
// A carrier that holds one live block stays mapped whole, so carriers far
// above their blocks are memory the node keeps but does not use.

// allocExpr returns a flat list the Go side reads word by word: mmap and
// what erts has mapped from the OS (carriers, mseg_alloc's cache); then
// Type, MbcCarriers, MbcBlocks, SbcCarriers, SbcBlocks, PoolCarriers for
// each type, then 'util', and per eheap/binary carrier-fill decile
// Type, Decile, Carriers, CarrierBytes, BlockBytes.
const allocExpr = `
Cur = fun(L, K) -> case lists:keyfind(K, 1, L) of {K, C, _, _} -> C; {K, C} -> C; _ -> 0 end end,
Blocks = fun(L) -> case lists:keyfind(blocks, 1, L) of
                       {blocks, Bs} when is_list(Bs) -> lists:sum([Cur(P, size) || {_, P} <- Bs, is_list(P)]);
                       _ -> 0
                   end end,
Types = erlang:system_info(alloc_util_allocators) -- [sys_alloc, mseg_alloc],
Sizes = lists:append([begin
    {MC, MB, SC, SB, PC} = lists:foldl(
        fun({instance, _, I}, {MC0, MB0, SC0, SB0, PC0}) ->
                M = proplists:get_value(mbcs, I, []), S = proplists:get_value(sbcs, I, []),
                P = proplists:get_value(mbcs_pool, I, []),
                {MC0 + Cur(M, carriers_size), MB0 + Blocks(M), SC0 + Cur(S, carriers_size),
                 SB0 + Blocks(S), PC0 + Cur(P, carriers_size)};
           (_, Acc) -> Acc
        end, {0, 0, 0, 0, 0}, case erlang:system_info({allocator, A}) of L when is_list(L) -> L; _ -> [] end),
    [A, MC, MB, SC, SB, PC]
  end || A <- Types]),
Util = case instrument:carriers(#{allocator_types => [eheap_alloc, binary_alloc]}) of
    {ok, {_, Carriers}} ->
        Fill = lists:foldl(
            fun({Type, _InPool, Total, _Unscanned, Allocs, _Free}, Acc) when Total > 0 ->
                    Used = lists:sum([Sz || {_, _, Sz} <- Allocs]),
                    D = min(9, Used * 10 div Total),
                    {N, T, U} = maps:get({Type, D}, Acc, {0, 0, 0}),
                    Acc#{{Type, D} => {N + 1, T + Total, U + Used}};
               (_, Acc) -> Acc
            end, #{}, Carriers),
        lists:append([[Type, D, N, T, U] || {{Type, D}, {N, T, U}} <- lists:sort(maps:to_list(Fill))]);
    _ -> []
end,
Mmap = case erlang:system_info({allocator, erts_mmap}) of
    [{default_mmap, D} | _] -> proplists:get_value(used, proplists:get_value(sizes, proplists:get_value(os, D, []), []), 0);
    _ -> 0
end,
[mmap, Mmap | Sizes] ++ [util | Util]`

// allocSizes is one allocator type's carriers and blocks, bytes.
type allocSizes struct {
	mbcCarriers, mbcBlocks, sbcCarriers, sbcBlocks, poolCarriers int64
}

// fillBucket is the carriers of one allocator type whose blocks fill them
// to one decile (0: under 10%, ..., 9: 90% and more).
type fillBucket struct {
	alloc                string
	decile               int
	carriers             int
	carrierSize, blockSz int64
}

// allocSample is the allocators' state and the process's memory as the
// kernel sees it (/proc/PID/smaps_rollup, bytes).
type allocSample struct {
	sizes                      map[string]allocSizes
	fill                       []fillBucket
	rss, anon, lazyFree        int64
	mmapped                    int64 // mapped by erts from the OS: mseg carriers and its cache
	carriersTotal, blocksTotal int64
}

func sampleAllocators(ctx context.Context, ej *harness.Ejabberd) (allocSample, error) {
	s := allocSample{sizes: map[string]allocSizes{}}
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	v, err := ej.Eval(ctx, allocExpr)
	if err != nil {
		return s, err
	}
	f := strings.FieldsFunc(v, func(r rune) bool { return strings.ContainsRune("[]{},' \n", r) })
	num := func(i int) int64 { n, _ := strconv.ParseInt(f[i], 10, 64); return n }
	if len(f) < 2 || f[0] != "mmap" {
		return s, fmt.Errorf("allocator breakdown: unexpected %q", v)
	}
	s.mmapped = num(1)
	i := 2
	for ; i+5 < len(f) && f[i] != "util"; i += 6 {
		a := allocSizes{num(i + 1), num(i + 2), num(i + 3), num(i + 4), num(i + 5)}
		s.sizes[f[i]] = a
		s.carriersTotal += a.mbcCarriers + a.sbcCarriers
		s.blocksTotal += a.mbcBlocks + a.sbcBlocks
	}
	if i >= len(f) || f[i] != "util" {
		return s, fmt.Errorf("allocator breakdown: unexpected %q", v)
	}
	for i++; i+4 < len(f); i += 5 {
		d, _ := strconv.Atoi(f[i+1])
		n, _ := strconv.Atoi(f[i+2])
		s.fill = append(s.fill, fillBucket{f[i], d, n, num(i + 3), num(i + 4)})
	}
	s.rss, s.anon, s.lazyFree = smapsRollup(ej.Pid)
	return s, nil
}

// smapsRollup reads a process's resident, anonymous and lazily freed
// (MADV_FREE'd, still counted in RSS until the kernel needs the pages)
// memory.
func smapsRollup(pid int) (rss, anon, lazyFree int64) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "smaps_rollup"))
	if err != nil {
		return 0, 0, 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "Rss:":
			rss = kb * 1024
		case "Anonymous:":
			anon = kb * 1024
		case "LazyFree:":
			lazyFree = kb * 1024
		}
	}
	return rss, anon, lazyFree
}

// allocBreakdown samples the loaded node's allocators and follows its RSS
// for a while, and returns the report (also written to stderr at once).
func allocBreakdown(ctx context.Context, ej *harness.Ejabberd, label string, n int, base allocSample, baseRSS, loadedRSS int64) (string, error) {
	// A walk over every process; the probe node also starts slowly on a busy box.
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	loaded, err := sampleAllocators(ctx, ej)
	if err != nil {
		return "", err
	}
	// The largest processes, and the heap of a typical c2s (by the
	// median memory of the ejabberd_c2s processes).
	top, err := ej.Eval(ctx, `Info = [{M, P} || P <- processes(), {memory, M} <- [erlang:process_info(P, memory)]],
	    C2S = lists:sort([M || {M, P} <- Info, {dictionary, D} <- [erlang:process_info(P, dictionary)],
	                           lists:keyfind('$initial_call', 1, D) =:= {'$initial_call', {xmpp_stream_in, init, 1}}]),
	    Median = case C2S of [] -> none; _ -> lists:nth(length(C2S) div 2 + 1, C2S) end,
	    {Median, [{M, erlang:process_info(P, [registered_name, initial_call, current_function, heap_size, total_heap_size])}
	              || {M, P} <- lists:sublist(lists:reverse(lists:sort(Info)), 4)]}`)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	writeAllocDiff(&b, label, n, base, loaded)
	fmt.Fprintf(&b, "\nMedian c2s memory (bytes) and the largest processes:\n\n```\n%s\n```\n", strings.TrimSpace(top))
	writeRSSDecay(&b, ej.Pid, n, baseRSS, loadedRSS)
	fmt.Fprint(os.Stderr, b.String())
	return b.String(), nil
}

// writeAllocDiff prints, per session, how each allocator grew from the
// idle baseline to the loaded node, and the carrier fill of the loaded one.
func writeAllocDiff(w io.Writer, label string, n int, base, loaded allocSample) {
	per := func(a, b int64) float64 { return float64(b-a) / float64(n) / 1024 }
	fmt.Fprintf(w, "\n#### Allocators, %s (KiB per session over the baseline)\n\n", label)
	fmt.Fprintf(w, "RSS %.1f, anonymous %.1f, lazily freed %.1f; mapped by erts %.1f; all carriers %.1f, all blocks %.1f.\n\n",
		per(base.rss, loaded.rss), per(base.anon, loaded.anon), per(base.lazyFree, loaded.lazyFree),
		per(base.mmapped, loaded.mmapped), per(base.carriersTotal, loaded.carriersTotal), per(base.blocksTotal, loaded.blocksTotal))
	fmt.Fprintf(w, "| allocator | mbc carriers | mbc blocks | sbc carriers | sbc blocks | pooled carriers |\n|---|---|---|---|---|---|\n")
	var names []string
	for name := range loaded.sizes {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		a, b := base.sizes[name], loaded.sizes[name]
		if b == a {
			continue
		}
		fmt.Fprintf(w, "| %s | %.1f | %.1f | %.1f | %.1f | %.1f |\n", name, per(a.mbcCarriers, b.mbcCarriers), per(a.mbcBlocks, b.mbcBlocks),
			per(a.sbcCarriers, b.sbcCarriers), per(a.sbcBlocks, b.sbcBlocks), per(a.poolCarriers, b.poolCarriers))
	}
	fmt.Fprintf(w, "\nCarrier fill on the loaded node (MiB):\n\n| allocator | filled | carriers | carrier MiB | block MiB |\n|---|---|---|---|---|\n")
	for _, f := range loaded.fill {
		fmt.Fprintf(w, "| %s | %d-%d%% | %d | %.1f | %.1f |\n", f.alloc, f.decile*10, f.decile*10+10, f.carriers,
			float64(f.carrierSize)/(1<<20), float64(f.blockSz)/(1<<20))
	}
}

// writeRSSDecay follows beam's RSS for a while after the forced GC:
// carriers the GC emptied wait in mseg_alloc's cache (up to 10 per
// scheduler), which gives one back to the OS about every second.
func writeRSSDecay(w io.Writer, pid, n int, base, atGC int64) {
	per := func(v int64) float64 { return float64(v-base) / float64(n) / 1024 }
	fmt.Fprintf(w, "\nbeam RSS after the forced GC, KiB per session: at once %.1f", per(atGC))
	for i := 1; i <= 15; i++ {
		time.Sleep(time.Second)
		if i%3 == 0 {
			fmt.Fprintf(w, ", %d s %.1f", i, per(rss(pid)))
		}
	}
	fmt.Fprintln(w)
}
