%% @doc Caps log lines about refused or ignored messages: at most one line
%% per key every ?WINDOW_MS. Whoever can send us messages can send many,
%% and a line per message would let them fill the disk and drown what
%% matters; the first line says what happens, the next one (a window
%% later) says how many were left out meanwhile.
-module(megaphone_logcap).

-export([new/0, check/2, check/3]).

-define(WINDOW_MS, 10000).
%% Keys can come from peers (node names); past this many the memory is
%% dropped rather than grown.
-define(MAX_KEYS, 1000).

-type cap() :: #{term() => {integer(), non_neg_integer()}}.
-export_type([cap/0]).

-spec new() -> cap().
new() -> #{}.

%% @doc Whether a line about Key may be logged now, with how many lines
%% about it were left out since the last one, and the cap to keep.
-spec check(term(), cap()) -> {log, non_neg_integer(), cap()} | {skip, cap()}.
check(Key, Cap) ->
    check(Key, Cap, erlang:monotonic_time(millisecond)).

-spec check(term(), cap(), integer()) -> {log, non_neg_integer(), cap()} | {skip, cap()}.
check(Key, Cap, Now) ->
    case maps:find(Key, Cap) of
        {ok, {Last, Skipped}} when Now - Last < ?WINDOW_MS ->
            {skip, Cap#{Key => {Last, Skipped + 1}}};
        {ok, {_, Skipped}} ->
            {log, Skipped, Cap#{Key => {Now, 0}}};
        error when map_size(Cap) >= ?MAX_KEYS ->
            {log, 0, #{Key => {Now, 0}}};
        error ->
            {log, 0, Cap#{Key => {Now, 0}}}
    end.
