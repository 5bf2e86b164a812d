%% EUnit tests of the shim against a stand-in sidecar (a local process) and
%% a stand-in ejabberd_bosh. The real thing is exercised by the Go
%% integration tests in test/; these pin the shim's own rules.
-module(megaphone_tests).
-include_lib("eunit/include/eunit.hrl").

-export([fake_bosh/2, fake_c2s/1, fake_c2s_reporting/2]).

shim_test_() ->
    {foreach, fun setup/0, fun cleanup/1,
     [fun hello_and_request/0,
      fun refuses_unknown_version/0,
      fun repeated_hello_gets_same_session/0,
      fun bad_messages_are_ignored/0,
      fun cancel_kills_worker/0,
      fun sidecar_death_ends_everything/0,
      fun crash_becomes_500/0,
      fun status_reports_sessions/0,
      fun commands_reach_the_sidecar/0,
      fun random_messages_change_nothing/0,
      fun local_hello_refused_by_default/0,
      fun version_3_needs_the_token/0]}.

setup() ->
    load_fake_bosh(),
    %% The stand-in sidecars here are local processes, which the listener
    %% refuses unless told otherwise.
    application:load(megaphone),
    application:set_env(megaphone, allow_local_sidecars, true),
    ok = megaphone:start().

cleanup(_) ->
    ok = megaphone:stop(),
    application:unset_env(megaphone, allow_local_sidecars),
    application:unset_env(megaphone, allowed_sidecars),
    code:purge(ejabberd_bosh),
    code:delete(ejabberd_bosh).

%% ejabberd_bosh stand-in: echoes the body, blocks on <<"block">> (telling
%% the test its pid), and crashes on <<"crash">>.
load_fake_bosh() ->
    Forms = [{attribute, 1, module, ejabberd_bosh},
             {attribute, 2, export, [{process_request, 3}]},
             {function, 3, process_request, 3,
              [{clause, 3, [{var, 3, 'Body'}, {var, 3, 'Peer'}, {atom, 3, xml}], [],
                [{call, 4, {remote, 4, {atom, 4, megaphone_tests}, {atom, 4, fake_bosh}},
                  [{var, 4, 'Body'}, {var, 4, 'Peer'}]}]}]}],
    {ok, Mod, Bin} = compile:forms(Forms),
    {module, Mod} = code:load_binary(Mod, "ejabberd_bosh.erl", Bin).

fake_bosh(<<"block">>, _Peer) ->
    catch (whereis(test_probe) ! {blocked, self()}),
    receive after infinity -> ok end;
fake_bosh(<<"crash">>, _Peer) ->
    error(boom);
fake_bosh(Body, Peer) ->
    {200, <<"OK">>, [{<<"Content-Type">>, <<"text/xml; charset=utf-8">>}],
     [<<"echo:">>, Body, io_lib:format(":~p", [Peer])]}.

hello(Sidecar) ->
    megaphone_listener ! {megaphone_hello, Sidecar, 1, #{min_version => 1, name => <<"t">>}},
    receive {megaphone_welcome, Session, 1, Info} when is_map(Info) -> Session
    after 2000 -> error(no_welcome)
    end.

hello_and_request() ->
    Session = hello(self()),
    Peer = {{127, 0, 0, 7}, 4242},
    Session ! {bosh_request, 1, 10, Peer, <<"<body/>">>},
    receive
        {bosh_response, 1, 10, 200, <<"OK">>, Headers, Body} ->
            ?assertEqual([{<<"Content-Type">>, <<"text/xml; charset=utf-8">>}], Headers),
            ?assertEqual(<<"echo:<body/>:{{127,0,0,7},4242}">>, Body)
    after 2000 -> error(no_response)
    end.

refuses_unknown_version() ->
    megaphone_listener ! {megaphone_hello, self(), 99, #{min_version => 50}},
    receive {megaphone_refused, Reason, [1, 2, 3]} -> ?assert(is_binary(Reason))
    after 2000 -> error(no_refusal)
    end.

repeated_hello_gets_same_session() ->
    S1 = hello(self()),
    S2 = hello(self()),
    ?assertEqual(S1, S2),
    ?assertEqual(1, length(maps:get(sidecars, megaphone:status()))).

bad_messages_are_ignored() ->
    Session = hello(self()),
    Atoms = erlang:system_info(atom_count),
    [Session ! M || M <- [garbage, {bosh_request, -1, 1, {{1,2,3,4}, 1}, <<>>},
                          {bosh_request, 1, 1, {{1,2,3,4}, 1}, not_binary},
                          {bosh_request, 1, 1 bsl 64, {{1,2,3,4}, 1}, <<>>}]],
    megaphone_listener ! {megaphone_hello, not_a_pid, 1, #{}},
    Session ! {bosh_request, 2, 3, {{300, 0, 0, 1}, 1}, <<"x">>},
    receive {bosh_response, 2, 3, 500, <<"bad peer address">>, _, _} -> ok
    after 2000 -> error(no_rejection)
    end,
    ?assert(is_process_alive(Session)),
    ?assert(is_process_alive(whereis(megaphone_listener))),
    ?assertEqual(Atoms, erlang:system_info(atom_count)).

cancel_kills_worker() ->
    register(test_probe, self()),
    Session = hello(self()),
    Session ! {bosh_request, 5, 6, {{127, 0, 0, 1}, 1}, <<"block">>},
    Worker = receive {blocked, W} -> W after 2000 -> error(not_blocked) end,
    Ref = monitor(process, Worker),
    Session ! {bosh_cancel, 5, 6},
    receive {'DOWN', Ref, process, Worker, killed} -> ok after 2000 -> error(not_killed) end,
    ?assertMatch([#{in_flight := 0, cancelled := 1}], maps:get(sidecars, megaphone:status())),
    unregister(test_probe).

sidecar_death_ends_everything() ->
    register(test_probe, self()),
    Parent = self(),
    Sidecar = spawn(fun() ->
                            S = hello(self()),
                            Parent ! {session, S},
                            receive stop -> ok end
                    end),
    Session = receive {session, S} -> S after 2000 -> error(no_session) end,
    Session ! {bosh_request, 1, 1, {{127, 0, 0, 1}, 1}, <<"block">>},
    Worker = receive {blocked, W} -> W after 2000 -> error(not_blocked) end,
    WRef = monitor(process, Worker),
    SRef = monitor(process, Session),
    Sidecar ! stop,
    receive {'DOWN', WRef, process, Worker, killed} -> ok after 2000 -> error(worker_leaked) end,
    receive {'DOWN', SRef, process, Session, normal} -> ok after 2000 -> error(session_leaked) end,
    ?assertEqual([], maps:get(sidecars, megaphone:status())),
    unregister(test_probe).

crash_becomes_500() ->
    Session = hello(self()),
    Session ! {bosh_request, 3, 4, {{127, 0, 0, 1}, 1}, <<"crash">>},
    receive {bosh_response, 3, 4, 500, _, _, _} -> ok
    after 2000 -> error(no_500)
    end,
    ?assert(is_process_alive(Session)).

status_reports_sessions() ->
    _ = hello(self()),
    #{running := true, sidecars := [S], protocol_versions := [1, 2, 3]} = megaphone:status(),
    ?assertEqual(self(), maps:get(sidecar, S)).

%% A version 2 sidecar stand-in that answers commands as the real one does.
fake_sidecar(Parent) ->
    megaphone_listener ! {megaphone_hello, self(), 2, #{min_version => 1, name => <<"fake">>}},
    receive {megaphone_welcome, _, 2, _} -> Parent ! ready after 2000 -> exit(no_welcome) end,
    fake_sidecar_loop().

fake_sidecar_loop() ->
    receive
        {megaphone_control, From, Ref, {connections, Filter}} ->
            Row = #{id => 7, transport => tls, peer => {{127, 0, 0, 1}, 5}, jid => undefined,
                    session => <<>>, age_s => 3, bytes_in => 1, bytes_out => 2, sidecar => <<"fake">>},
            From ! {megaphone_reply, Ref, [Row#{filter => Filter}]},
            fake_sidecar_loop();
        {megaphone_control, From, Ref, {kick, 7}} ->
            From ! {megaphone_reply, Ref, ok},
            fake_sidecar_loop();
        {megaphone_control, From, Ref, {info, 7}} ->
            From ! {megaphone_reply, Ref, {ok, #{id => 7, sidecar => <<"fake">>}}},
            fake_sidecar_loop();
        {megaphone_control, From, Ref, Command} ->
            From ! {megaphone_reply, Ref, {echo, Command}},
            fake_sidecar_loop();
        stop ->
            ok
    end.

commands_reach_the_sidecar() ->
    Self = self(),
    Fake = spawn_link(fun() -> fake_sidecar(Self) end),
    receive ready -> ok after 3000 -> error(no_fake_sidecar) end,
    %% The filter goes out with binaries for values; bad ones never leave.
    [#{id := 7, filter := Wire}] = megaphone:connections(#{transport => tls, peer => "127.0.0.1",
                                                          jid => "a@b", limit => 5}),
    ?assertEqual(#{transport => <<"tls">>, peer => <<"127.0.0.1">>, jid => <<"a@b">>, limit => 5}, Wire),
    ?assertEqual({error, {bad_filter, {transport, pigeon}}}, megaphone:connections(#{transport => pigeon})),
    ?assertEqual({error, {bad_filter, {peer, "not an ip"}}}, megaphone:connections(#{peer => "not an ip"})),
    ?assertMatch({ok, #{id := 7}}, megaphone:info(7)),
    ?assertEqual({ok, 1}, megaphone:kick(7)),
    ?assertEqual({error, {bad_limits, #{max_connz => 1}}}, megaphone:limits(#{max_connz => 1})),
    ?assertEqual([#{sidecar => <<"fake">>, limits => {echo, {limits, #{max_conns => 10}}}}],
                 megaphone:limits(#{max_conns => 10})),
    %% The stand-in's status is no map, so the drain report cannot count.
    ?assertEqual([#{sidecar => <<"fake">>, open => unknown}], megaphone:drain()),
    %% Late answers never reach the caller's mailbox.
    ?assertEqual({messages, []}, erlang:process_info(self(), messages)),
    Fake ! stop.

version_choice_test() ->
    ?assertEqual({ok, 1}, megaphone_listener:choose_version(1, 1)),
    ?assertEqual({ok, 2}, megaphone_listener:choose_version(1, 2)),
    ?assertEqual({ok, 3}, megaphone_listener:choose_version(1, 5)),
    ?assertEqual(error, megaphone_listener:choose_version(4, 5)).

local_hello_refused_by_default() ->
    application:unset_env(megaphone, allow_local_sidecars),
    megaphone_listener ! {megaphone_hello, self(), 3, #{min_version => 1}},
    receive {megaphone_refused, Reason, [1, 2, 3]} -> ?assertMatch(<<"a local process", _/binary>>, Reason)
    after 2000 -> error(no_refusal)
    end,
    ?assertEqual([], maps:get(sidecars, megaphone:status())).

%% Who may attach: the allowlist's rules, one origin at a time.
admit_test() ->
    Any = undefined,
    Only = {ok, [<<"megaphone*@localhost">>, "edge@host"]},
    ?assertEqual(ok, megaphone_listener:admit(hidden, <<"megaphone_1@localhost">>, Any)),
    ?assertEqual(ok, megaphone_listener:admit(hidden, <<"megaphone_1@localhost">>, Only)),
    ?assertEqual(ok, megaphone_listener:admit(hidden, <<"edge@host">>, Only)),
    ?assertMatch({refused, _}, megaphone_listener:admit(hidden, <<"probe@localhost">>, Only)),
    ?assertMatch({refused, _}, megaphone_listener:admit(hidden, <<"x@y">>, {ok, []})),
    ?assertMatch({refused, _}, megaphone_listener:admit(hidden, <<"x@y">>, {ok, <<"*">>})),
    %% A visible node never, even when its name matches.
    ?assertMatch({refused, _}, megaphone_listener:admit(visible, <<"megaphone_1@localhost">>, Only)),
    ?assertMatch({refused, _}, megaphone_listener:admit(visible, <<"ej2@localhost">>, Any)),
    ?assertMatch({refused, _}, megaphone_listener:admit(unconnected, <<"megaphone_1@localhost">>, Any)),
    ?assertMatch({refused, _}, megaphone_listener:admit(local, <<"nonode@nohost">>, Any)),
    ?assertEqual(ok, megaphone_listener:admit(port_carrier, <<"nonode@nohost">>, {ok, []})).

name_pattern_test() ->
    M = fun megaphone_listener:name_matches/2,
    ?assert(M(<<"*">>, <<"anything@host">>)),
    ?assert(M(<<"*">>, <<>>)),
    ?assert(M(<<"a*b*c">>, <<"aXXbYYc">>)),
    ?assert(M(<<"megaphone*@localhost">>, <<"megaphone@localhost">>)),
    ?assertNot(M(<<"megaphone*@localhost">>, <<"megaphone_1@localhost.evil">>)),
    ?assertNot(M(<<"megaphone*@localhost">>, <<"xmegaphone@localhost">>)),
    ?assertNot(M(<<"a.c">>, <<"abc">>)),             % no regular expression
    ?assertNot(M(<<>>, <<"a">>)).

logcap_test() ->
    C0 = megaphone_logcap:new(),
    {log, 0, C1} = megaphone_logcap:check(k, C0, 0),
    {skip, C2} = megaphone_logcap:check(k, C1, 5000),
    {skip, C3} = megaphone_logcap:check(k, C2, 9999),
    {log, 0, C4} = megaphone_logcap:check(other, C3, 9999),
    {log, 2, C5} = megaphone_logcap:check(k, C4, 10000),
    {skip, _} = megaphone_logcap:check(k, C5, 19999),
    %% Keys from peers cannot grow it without bound.
    Many = lists:foldl(fun(I, C) -> {log, 0, C1x} = megaphone_logcap:check(I, C, 0), C1x end,
                       C0, lists:seq(1, 5000)),
    ?assert(map_size(Many) =< 1000).

%% Version 3: the welcome carries a token; a message with it is served,
%% one without it or with another is ignored (and counted), never served.
version_3_needs_the_token() ->
    megaphone_listener ! {megaphone_hello, self(), 3, #{min_version => 1}},
    {Session, Token} = receive {megaphone_welcome, S, 3, #{token := T}} -> {S, T}
                       after 2000 -> error(no_welcome)
                       end,
    ?assertEqual(16, byte_size(Token)),
    Peer = {{127, 0, 0, 1}, 1},
    Session ! {bosh_request, 1, 1, Peer, <<"bare">>},
    Session ! {from_sidecar, <<"guess">>, {bosh_request, 1, 2, Peer, <<"forged">>}},
    Session ! {from_sidecar, Token, {bosh_request, 1, 3, Peer, <<"real">>}},
    receive {bosh_response, 1, Id, _, _, _, Body} ->
            ?assertEqual({3, <<"echo:real:{{127,0,0,1},1}">>}, {Id, iolist_to_binary(Body)})
    after 2000 -> error(no_response)
    end,
    receive {bosh_response, _, _, _, _, _, _} = Extra -> error({served, Extra})
    after 200 -> ok
    end,
    %% (megaphone:status() would ask this stand-in, which does not answer.)
    ?assertMatch(#{ignored := 2, requests := 1}, megaphone_sidecar:status(Session)).

%% Generated input: thousands of random terms, shaped like the protocol's
%% messages and not, sent to the listener and to a session. Neither dies,
%% no atom is created, and the session still serves a real request.
random_messages_change_nothing() ->
    rand:seed(exsss, {1, 2, 3}),
    Session = hello(self()),
    Tags = [megaphone_hello, bosh_request, bosh_cancel, c2s_open, rewelcome, x],
    Fuzz = fun(N) ->
                   [begin
                        Tag = lists:nth(rand:uniform(length(Tags)), Tags),
                        Msg = list_to_tuple([Tag | [random_term(3) || _ <- lists:seq(1, rand:uniform(6) - 1)]]),
                        megaphone_listener ! Msg,
                        Session ! Msg
                    end || _ <- lists:seq(1, N)],
                   sys:get_state(megaphone_listener),
                   sys:get_state(Session)
           end,
    %% A first round loads the modules the error paths use (logger
    %% formatting, the code server's lookups): their atoms are the code's,
    %% created once. After it, client-shaped input must create none.
    Fuzz(300),
    Atoms = erlang:system_info(atom_count),
    Fuzz(3000),
    Session ! {bosh_request, 77, 88, {{127, 0, 0, 1}, 9}, <<"<body/>">>},
    ?assertEqual(ok, receive_response(77, 88)),
    ?assert(is_process_alive(Session)),
    ?assert(is_process_alive(whereis(megaphone_listener))),
    ?assertEqual(Atoms, erlang:system_info(atom_count)).

%% Everything but 200 from the fuzzing above is an answer to a malformed
%% request; skip those and wait for the real one.
receive_response(ConnId, ReqId) ->
    receive
        {bosh_response, ConnId, ReqId, 200, _, _, _} -> ok
    after 5000 -> timeout
    end.

random_term(0) ->
    random_leaf();
random_term(Depth) ->
    case rand:uniform(6) of
        1 -> list_to_tuple([random_term(Depth - 1) || _ <- lists:seq(1, rand:uniform(4))]);
        2 -> [random_term(Depth - 1) || _ <- lists:seq(1, rand:uniform(3))];
        3 -> #{random_leaf() => random_term(Depth - 1)};
        _ -> random_leaf()
    end.

random_leaf() ->
    case rand:uniform(8) of
        1 -> rand:uniform(1 bsl 70) - (1 bsl 69);
        2 -> -rand:uniform(100);
        3 -> crypto:strong_rand_bytes(rand:uniform(8));
        4 -> <<"tcp">>;
        5 -> {{127, 0, 0, 1}, rand:uniform(70000)};
        6 -> self();
        7 -> make_ref();
        8 -> rand:uniform()
    end.

%% The sid of a BOSH body's root, as the session reads it to keep a
%% session's requests in order; a sid deeper in the body is not the root's.
session_id_test() ->
    S = fun megaphone_bosh:session_id/1,
    ?assertEqual(<<"abc">>, S(<<"<body xmlns='http://jabber.org/protocol/httpbind' rid='5' sid='abc'><iq sid='x'/></body>">>)),
    ?assertEqual(<<"s1">>, S(<<"<?xml version='1.0'?>\n<!-- c --><b:body xmlns:b=\"x\" to = \"a sid='q'\" sid = \"s1\"/>">>)),
    ?assertEqual(none, S(<<"<body xmlns='x' rid='5'><x sid='no'/></body>">>)),
    ?assertEqual(none, S(<<"garbage">>)),
    ?assertEqual(none, S(<<>>)),
    ?assertEqual(none, S(<<"<body sid>">>)).

%% The login collection: a new c2s is collected as soon as it goes idle,
%% again after later work, and not at all when login_gc_interval is 0.
login_gc_test_() ->
    {foreach, fun login_gc_setup/0, fun login_gc_cleanup/1,
     [fun new_c2s_is_collected_once_idle/0,
      fun login_gc_can_be_off/0]}.

login_gc_setup() ->
    setup(),
    application:set_env(megaphone, login_gc_interval, 50),
    load_source(["-module(ejabberd_c2s_config).", "-export([get_c2s_limits/0]).",
                 "get_c2s_limits() -> []."]),
    load_source(["-module(ejabberd_c2s).", "-export([start/3, accept/1]).",
                 "start(_SockMod, _Socket, _Opts) -> megaphone_tests:fake_c2s(self()).",
                 "accept(_Pid) -> ok."]).

login_gc_cleanup(Arg) ->
    application:unset_env(megaphone, login_gc_interval),
    [begin code:purge(M), code:delete(M) end || M <- [ejabberd_c2s, ejabberd_c2s_config]],
    cleanup(Arg).

%% Compiles and loads a module from its source text, one form a string.
load_source(Forms) ->
    Parsed = [begin {ok, Toks, _} = erl_scan:string(F), {ok, Form} = erl_parse:parse_form(Toks), Form end
              || F <- Forms],
    {ok, Mod, Bin} = compile:forms(Parsed),
    {module, Mod} = code:load_binary(Mod, atom_to_list(Mod) ++ ".erl", Bin),
    ok.

%% ejabberd_c2s stand-in: a process that makes a login's worth of garbage
%% before start returns (so the test sees it), then more on {work, From}.
fake_c2s(Starter) ->
    Pid = spawn(fun() -> make_garbage(), Starter ! {logged_in, self()}, fake_c2s_loop() end),
    receive {logged_in, Pid} -> {ok, Pid} after 2000 -> {error, timeout} end.

fake_c2s_loop() ->
    receive
        {work, From} -> make_garbage(), From ! worked, fake_c2s_loop();
        stop -> ok
    end.

make_garbage() ->
    50000 = length(lists:seq(1, 50000)),
    ok.

open_fake_c2s(Session) ->
    Session ! {c2s_open, 1, <<"tcp">>, {{127, 0, 0, 1}, 1}, {{127, 0, 0, 1}, 5222}},
    receive {c2s_started, 1, C2S, _} -> C2S after 2000 -> error(no_c2s) end.

heap_words(Pid) ->
    {total_heap_size, W} = erlang:process_info(Pid, total_heap_size),
    W.

%% Polls every 20 ms, at most Tries times.
wait_until(_Cond, 0) -> timeout;
wait_until(Cond, Tries) ->
    case Cond() of
        true -> ok;
        false -> timer:sleep(20), wait_until(Cond, Tries - 1)
    end.

new_c2s_is_collected_once_idle() ->
    Session = hello(self()),
    C2S = open_fake_c2s(Session),
    ?assert(heap_words(C2S) > 50000),
    ?assertEqual(ok, wait_until(fun() -> heap_words(C2S) < 5000 end, 100)),
    %% Idle from then on: the collection's own reductions do not make it
    %% due again (three more looks)...
    timer:sleep(150),
    ?assertMatch(#{gc_login := 1}, megaphone_sidecar:status(Session)),
    %% ...but more work (the login's later round trips) is collected once
    %% it stops, while the c2s is still fresh (10 looks).
    C2S ! {work, self()},
    receive worked -> ok after 2000 -> error(no_work) end,
    ?assertEqual(ok, wait_until(fun() -> heap_words(C2S) < 5000 end, 100)),
    %% After its last look a c2s is the sweep's.
    timer:sleep(500),
    C2S ! {work, self()},
    receive worked -> ok after 2000 -> error(no_work) end,
    timer:sleep(300),
    ?assert(heap_words(C2S) > 50000),
    ?assertMatch(#{gc_login := 2}, megaphone_sidecar:status(Session)),
    C2S ! stop.

login_gc_can_be_off() ->
    application:set_env(megaphone, login_gc_interval, 0),
    Session = hello(self()),
    C2S = open_fake_c2s(Session),
    timer:sleep(300),
    ?assert(heap_words(C2S) > 50000),
    ?assertMatch(#{gc_login := 0, streams := 1}, megaphone_sidecar:status(Session)),
    C2S ! stop.

%% A BOSH session served at the edge opens its c2s with transport
%% <<"http_bind">>: the socket c2s gets says http_bind (so c2s behaves as
%% under ejabberd_bosh); a transport the shim does not know is refused and
%% starts nothing, and no atom is made of it.
http_bind_transport_test_() ->
    {setup,
     fun() ->
             setup(),
             load_source(["-module(ejabberd_c2s_config).", "-export([get_c2s_limits/0]).",
                          "get_c2s_limits() -> [{max_stanza_size, 65536}]."]),
             load_source(["-module(ejabberd_c2s).", "-export([start/3, accept/1]).",
                          "start(SockMod, Socket, _Opts) -> megaphone_tests:fake_c2s_reporting(SockMod, Socket).",
                          "accept(_Pid) -> ok."])
     end,
     fun(Arg) ->
             [begin code:purge(M), code:delete(M) end || M <- [ejabberd_c2s, ejabberd_c2s_config]],
             cleanup(Arg)
     end,
     fun() ->
             register(megaphone_transport_probe, self()),
             Session = hello(self()),
             Peer = {{127, 0, 0, 1}, 40000},
             Session ! {c2s_open, 9, <<"http_bind">>, Peer, {{127, 0, 0, 1}, 5280}},
             C2S = receive {c2s_started, 9, P, #{max_stanza_size := 65536}} -> P
                   after 2000 -> error(no_c2s) end,
             receive {c2s_socket, C2S, Transport, Peername, Owner} ->
                     ?assertEqual(http_bind, Transport),
                     ?assertEqual({ok, Peer}, Peername),
                     ?assertEqual(self(), Owner)
             after 2000 -> error(no_socket_report)
             end,
             Atoms = erlang:system_info(atom_count),
             Session ! {c2s_open, 10, <<"http_bind_x">>, Peer, {{127, 0, 0, 1}, 5280}},
             receive {c2s_refused, 10, <<"bad c2s_open">>} -> ok
             after 2000 -> error(no_refusal) end,
             ?assertEqual(Atoms, erlang:system_info(atom_count)),
             ?assertMatch(#{streams := 1}, megaphone_sidecar:status(Session)),
             C2S ! stop,
             unregister(megaphone_transport_probe)
     end}.

%% ejabberd_c2s stand-in that reports what xmpp_socket would ask its socket.
fake_c2s_reporting(SockMod, Socket) ->
    Pid = spawn(fun() ->
                        megaphone_transport_probe ! {c2s_socket, self(), SockMod:get_transport(Socket),
                                                     SockMod:peername(Socket), SockMod:get_owner(Socket)},
                        fake_c2s_loop()
                end),
    {ok, Pid}.
