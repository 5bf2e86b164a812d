%% @doc The operator's interface to the shim, for the erl shell
%% (`ejabberdctl debug'):
%%
%%   1> code:add_patha("/opt/megaphone/erlang/ebin").
%%   2> megaphone:start().
%%   3> megaphone:status().
%%   4> megaphone:connections(#{transport => tls, limit => 10}).
%%   5> megaphone:kick(<<"alice@example.org">>).
%%   6> megaphone:limits(#{max_conns_per_ip => 50}).
%%   7> megaphone:drain().
%%
%% Commands about connections go to every attached sidecar at once (the
%% sidecar owns the sockets and knows their bytes, peers and JIDs) and are
%% answered within ?TIMEOUT; a sidecar that does not answer in time is
%% reported, never waited for.
-module(megaphone).

-export([start/0, stop/0, status/0,
         connections/0, connections/1, info/1, kick/1,
         drain/0, resume/0, limits/0, limits/1,
         start_port/2, stop_port/1, ports/0]).

-define(TIMEOUT, 5000).
-define(LIMITS, [max_conns, max_conns_per_ip, max_body_bytes, max_stanza_bytes, max_bosh_requests_per_sec]).
-define(TRANSPORTS, [tcp, tls, websocket, bosh]).

-type conn_id() :: non_neg_integer().
-type filter() :: #{transport => tcp | tls | websocket | bosh,
                    peer => inet:ip_address() | string() | binary(),
                    jid => binary() | string(),
                    limit => non_neg_integer()}.
-type connection() :: #{id := conn_id(),
                        transport := atom(),
                        peer := {inet:ip_address(), inet:port_number()},
                        jid := binary() | undefined,
                        session := binary(),
                        age_s := non_neg_integer(),
                        bytes_in := non_neg_integer(),
                        bytes_out := non_neg_integer(),
                        sidecar := binary()}.
-export_type([conn_id/0, filter/0, connection/0]).

%% @doc Starts the shim; sidecars can attach from then on.
-spec start() -> ok | {error, term()}.
start() ->
    case application:ensure_all_started(megaphone) of
        {ok, _} -> ok;
        {error, _} = Error -> Error
    end.

%% @doc Stops the shim and unloads it. Every attached sidecar's session
%% ends, and with it every request in flight and every stream it fed; the
%% sidecars keep their listeners and re-attach when the shim is back
%% (`megaphone:start()' loads it again from the code path).
-spec stop() -> ok | {error, term()}.
stop() ->
    case application:stop(megaphone) of
        Stopped when Stopped =:= ok; Stopped =:= {error, {not_started, megaphone}} ->
            unload();
        Error ->
            Error
    end.

%% The caller runs this module's code, so it cannot be purged under it:
%% every other module goes now, this one is marked old and purged softly
%% by a process of its own once the shell has returned from this call.
unload() ->
    Mods = case application:get_key(megaphone, modules) of
               {ok, Ms} -> Ms;
               undefined -> []
           end,
    _ = application:unload(megaphone),
    [begin code:purge(M), code:delete(M), code:purge(M) end || M <- Mods, M =/= ?MODULE],
    code:delete(?MODULE),
    spawn(fun() -> timer:sleep(1000), code:soft_purge(?MODULE) end),
    ok.

%% @doc What is attached: one map per sidecar, with the shim's view of its
%% session (protocol, uptime, requests) and the sidecar's own report
%% (connections by transport, bytes, limits, draining), plus totals.
-spec status() -> #{running := boolean(),
                    protocol_versions := [pos_integer()],
                    sidecars := [map()],
                    connections := #{atom() => non_neg_integer()},
                    bytes_in := non_neg_integer(),
                    bytes_out := non_neg_integer(),
                    in_flight := non_neg_integer()}.
status() ->
    Running = whereis(megaphone_listener) =/= undefined,
    Sessions = [S || S <- sessions(), is_map(S)],
    Reports = ask_all(Sessions, status),
    Sidecars = [S#{report => R} || {S, R} <- lists:zip(Sessions, Reports)],
    Good = [R || R <- Reports, is_map(R)],
    #{running => Running,
      protocol_versions => megaphone_listener:supported_versions(),
      sidecars => Sidecars,
      connections => sum_maps([maps:get(connections, R, #{}) || R <- Good]),
      bytes_in => lists:sum([maps:get(bytes_in, R, 0) || R <- Good]),
      bytes_out => lists:sum([maps:get(bytes_out, R, 0) || R <- Good]),
      in_flight => lists:sum([maps:get(in_flight, S) || S <- Sessions])}.

%% @doc Every client connection of every attached sidecar, oldest first.
-spec connections() -> [connection()].
connections() -> connections(#{}).

%% @doc The connections that match Filter: `transport', `peer' (an IP
%% address), `jid' (a bare JID matches all its resources) and `limit'.
-spec connections(filter()) -> [connection()] | {error, {bad_filter, term()}}.
connections(Filter) when is_map(Filter) ->
    case wire_filter(Filter) of
        {ok, Wire} ->
            Rows = lists:append([R || R <- ask_all(sessions(), {connections, Wire}), is_list(R)]),
            %% Each sidecar's rows come oldest first; merged by age with
            %% a key sort, which takes 25 ms for 100,000 rows where a sort
            %% with a comparison fun takes 110 (BENCH.md).
            Sorted = [R || {_, R} <- lists:keysort(1, [{-maps:get(age_s, R), R} || R <- Rows])],
            case maps:find(limit, Wire) of
                {ok, N} when N > 0 -> lists:sublist(Sorted, N);
                _ -> Sorted
            end;
        {error, _} = Error ->
            Error
    end;
connections(Filter) ->
    {error, {bad_filter, Filter}}.

%% @doc One connection, with what ejabberd knows of it: for an XMPP stream
%% its c2s process (memory, mailbox) and session.
-spec info(conn_id()) -> {ok, map()} | {error, not_found}.
info(ConnId) when is_integer(ConnId), ConnId >= 0 ->
    case [Row || {ok, Row} <- ask_all(sessions(), {info, ConnId})] of
        [Row | _] -> {ok, with_ejabberd_info(Row)};
        [] -> {error, not_found}
    end.

%% @doc Ends a connection (by id) or every connection of a JID (a bare JID:
%% all its resources). A bound session is ended by ejabberd itself, as
%% `ejabberdctl kick_user' does, so the client gets a policy-violation
%% stream error and ejabberd cleans the session up; a connection not yet
%% bound is closed by its sidecar with the same stream error. Returns how
%% many connections were kicked.
-spec kick(conn_id() | binary() | string()) -> {ok, non_neg_integer()} | {error, term()}.
kick(ConnId) when is_integer(ConnId), ConnId >= 0 ->
    case [{S, Row} || {S, {ok, Row}} <- ask_each(sessions(), {info, ConnId})] of
        [{Session, Row} | _] -> {ok, kick_connection(Session, Row)};
        [] -> {error, not_found}
    end;
kick(Jid) when is_list(Jid) ->
    kick(unicode:characters_to_binary(Jid));
kick(Jid) when is_binary(Jid) ->
    case connections_of(Jid) of
        {ok, Found} -> {ok, lists:sum([kick_connection(S, Row) || {S, Row} <- Found])};
        {error, _} = Error -> Error
    end.

%% @doc Stops every sidecar taking new connections and BOSH sessions; the
%% open ones carry on until they end (or move, when their clients
%% reconnect elsewhere). Returns what each sidecar still holds; call
%% status() to follow the drain, resume() to take connections again.
-spec drain() -> [#{sidecar := binary(), open := non_neg_integer() | unknown}].
drain() ->
    set_draining(true).

%% @doc Undoes drain().
-spec resume() -> [#{sidecar := binary(), open := non_neg_integer() | unknown}].
resume() ->
    set_draining(false).

%% @doc The limits in force on each sidecar.
-spec limits() -> [#{sidecar := binary(), limits := map() | term()}].
limits() ->
    per_sidecar(limits).

%% @doc Changes limits on every sidecar, live: `max_conns',
%% `max_conns_per_ip', `max_body_bytes', `max_stanza_bytes',
%% `max_bosh_requests_per_sec' (0: none).
%% Each applies from the next connection, request or stream on.
-spec limits(#{atom() => non_neg_integer()}) ->
          [#{sidecar := binary(), limits := map() | term()}] | {error, {bad_limits, term()}}.
limits(Changes) when is_map(Changes) ->
    Bad = maps:filter(fun(K, V) -> not (lists:member(K, ?LIMITS) andalso is_integer(V) andalso V >= 0) end,
                      Changes),
    case maps:size(Bad) of
        0 -> per_sidecar({limits, Changes});
        _ -> {error, {bad_limits, Bad}}
    end;
limits(Other) ->
    {error, {bad_limits, Other}}.

%% @doc Runs the sidecar binary at Path as an Erlang port instead of a
%% hidden node: no distribution link, no cookie. Args are its flags (e.g.
%% ["--bosh-addr", "127.0.0.1:5280"]); the carrier adds `--carrier port'.
%% The shim restarts it if it exits; its clients' streams end with it, as
%% when a sidecar node goes down.
-spec start_port(file:filename_all(), [string()]) -> {ok, pid()} | {error, term()}.
start_port(Path, Args) when is_list(Args) ->
    case lists:all(fun io_lib:char_list/1, Args) of
        true -> megaphone_port_sup:start_port(Path, Args);
        false -> {error, {bad_args, Args}}
    end.

%% @doc Stops the port sidecar started from Path.
-spec stop_port(file:filename_all()) -> ok | {error, not_found}.
stop_port(Path) ->
    megaphone_port_sup:stop_port(Path).

%% @doc The port sidecars: path, carrier process and the sidecar's OS pid.
-spec ports() -> [#{path := file:filename_all(), carrier := pid() | atom(),
                    os_pid := non_neg_integer() | not_running}].
ports() ->
    [#{path => Path, carrier => Pid,
       os_pid => case is_pid(Pid) andalso catch megaphone_port:os_pid(Pid) of
                     {ok, OsPid} -> OsPid;
                     _ -> not_running
                 end}
     || {Path, Pid} <- megaphone_port_sup:ports()].

%%% Internals

%% The live sessions, as megaphone_sidecar:status/1 describes them.
sessions() ->
    case whereis(megaphone_listener) of
        undefined -> [];
        _ -> [S || Pid <- megaphone_sidecar_sup:sessions(), S <- [session_status(Pid)], is_map(S)]
    end.

session_status(Pid) ->
    try megaphone_sidecar:status(Pid)
    catch exit:_ -> gone
    end.

%% Sends Command to every sidecar at once and collects the answers in the
%% same order; a sidecar that does not answer in time gets
%% {error, timeout}.
ask_all(Sessions, Command) ->
    [Answer || {_, Answer} <- ask_each(Sessions, Command)].

%% The questions go out and the answers come back in a process of its
%% own, so an answer that comes too late dies with it instead of landing
%% in the operator's shell.
ask_each(Sessions, Command) ->
    {Pid, Ref} = spawn_monitor(fun() -> exit({answers, collect(Sessions, Command)}) end),
    receive
        {'DOWN', Ref, process, Pid, {answers, Answers}} -> Answers;
        {'DOWN', Ref, process, Pid, Reason} -> [{S, {error, Reason}} || S <- Sessions]
    end.

collect(Sessions, Command) ->
    Deadline = erlang:monotonic_time(millisecond) + ?TIMEOUT,
    Asked = [{S, ask(S, Command)} || S <- Sessions],
    [{S, await(Ref, Deadline)} || {S, Ref} <- Asked].

%% Commands are protocol version 2; a sidecar that speaks only version 1
%% is never sent one.
ask(#{protocol := Version}, _Command) when Version < 2 ->
    {error, {protocol_version, Version}};
ask(#{sidecar := Sidecar}, Command) ->
    megaphone_sidecar:control(Sidecar, Command).

await({error, _} = Error, _Deadline) ->
    Error;
await(Ref, Deadline) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {megaphone_reply, Ref, Answer} -> Answer
    after Left ->
        {error, timeout}
    end.

per_sidecar(Command) ->
    [#{sidecar => maps:get(name, S), limits => Answer} || {S, Answer} <- ask_each(sessions(), Command)].

set_draining(On) ->
    Sessions = sessions(),
    _ = ask_all(Sessions, {drain, On}),
    [#{sidecar => maps:get(name, S),
       open => case Report of #{open := N} -> N; _ -> unknown end}
     || {S, Report} <- ask_each(Sessions, status)].

%% The filter as the sidecar takes it: atoms from our fixed set as keys,
%% binaries as values (the sidecar never sees an atom it did not expect).
wire_filter(Filter) ->
    try {ok, maps:fold(fun wire_filter/3, #{}, Filter)}
    catch throw:Bad -> {error, {bad_filter, Bad}}
    end.

wire_filter(transport, T, Acc) when is_atom(T) ->
    lists:member(T, ?TRANSPORTS) orelse throw({transport, T}),
    Acc#{transport => atom_to_binary(T, utf8)};
wire_filter(peer, IP, Acc) when is_tuple(IP) ->
    case inet:ntoa(IP) of
        {error, _} -> throw({peer, IP});
        S -> Acc#{peer => list_to_binary(S)}
    end;
wire_filter(peer, IP, Acc) when is_list(IP); is_binary(IP) ->
    case inet:parse_address(unicode:characters_to_list(IP)) of
        {ok, Addr} -> wire_filter(peer, Addr, Acc);
        {error, _} -> throw({peer, IP})
    end;
wire_filter(jid, Jid, Acc) when is_list(Jid); is_binary(Jid) ->
    Acc#{jid => unicode:characters_to_binary(Jid)};
wire_filter(limit, N, Acc) when is_integer(N), N >= 0 ->
    Acc#{limit => N};
wire_filter(K, V, _Acc) ->
    throw({K, V}).

%% The connections bound to Jid, with the session of the sidecar that
%% holds each.
connections_of(Jid) ->
    case wire_filter(#{jid => Jid}) of
        {ok, Wire} ->
            {ok, [{S, Row} || {S, Rows} <- ask_each(sessions(), {connections, Wire}),
                              is_list(Rows), Row <- Rows]};
        {error, _} = Error ->
            Error
    end.

kick_connection(Session, #{jid := Jid} = Row) when is_binary(Jid) ->
    try jid:tolower(jid:decode(Jid)) of
        {U, S, R} ->
            %% ejabberd's own kick (ejabberdctl kick_user): the session's
            %% c2s ends with a policy-violation stream error and cleans up.
            case ejabberd_sm:kick_user(U, S, R) of
                true -> 1;
                false -> kick_by_sidecar(Session, Row)
            end
    catch _:_ ->
            kick_by_sidecar(Session, Row)
    end;
kick_connection(Session, Row) ->
    kick_by_sidecar(Session, Row).

kick_by_sidecar(Session, #{id := Id}) ->
    case ask_all([Session], {kick, Id}) of
        [ok] -> 1;
        _ -> 0
    end.

%% What ejabberd knows of a stream's c2s process, looked up in the session
%% that started it.
with_ejabberd_info(#{id := Id, sidecar := _} = Row) ->
    Pids = [P || S <- sessions(), P <- [megaphone_sidecar:c2s_of(maps:get(session, S), Id)], is_pid(P)],
    case Pids of
        [Pid | _] ->
            Info = erlang:process_info(Pid, [memory, message_queue_len, reductions]),
            Row#{c2s => Pid, c2s_process => maps:from_list(case Info of undefined -> []; _ -> Info end)};
        [] ->
            Row
    end.

sum_maps(Maps) ->
    lists:foldl(fun(M, Acc) ->
                        maps:fold(fun(K, V, A) when is_integer(V) -> maps:update_with(K, fun(X) -> X + V end, V, A);
                                     (_, _, A) -> A
                                  end, Acc, M)
                end, #{}, Maps).
