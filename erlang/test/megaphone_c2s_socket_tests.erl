%% EUnit tests of the virtual socket's writes over a real distribution link:
%% a peer node (OTP's peer module) stands in for the sidecar's node, and
%% stopping its OS process (SIGSTOP) fills the link the way a sidecar that
%% cannot keep up would.
-module(megaphone_c2s_socket_tests).
-include_lib("eunit/include/eunit.hrl").

%% A write that failed on a busy link makes every later write on that
%% socket fail, even once the link has room again: c2s goes on with its
%% mailbox after a failed write, and a later stanza must not reach the
%% client with the failed one missing. Other sockets on the same link are
%% not affected.
write_failure_is_sticky_test_() ->
    {timeout, 120, fun write_failure_is_sticky/0}.

write_failure_is_sticky() ->
    StartedDist = ensure_distributed(),
    {ok, Peer, PeerNode} = peer:start_link(#{name => peer:random_name(?MODULE)}),
    application:load(megaphone),
    application:set_env(megaphone, send_busy_timeout, 50),
    OsPid = erpc:call(PeerNode, os, getpid, []),
    try
        Sidecar = erpc:call(PeerNode, erlang, spawn, [timer, sleep, [infinity]]),
        Endpoint = {{127, 0, 0, 1}, 5222},
        Socket = megaphone_c2s_socket:new(Sidecar, 1, tcp, Endpoint, Endpoint),
        Other = megaphone_c2s_socket:new(Sidecar, 2, tcp, Endpoint, Endpoint),
        ?assertEqual(ok, megaphone_c2s_socket:send_xml(Socket, {xmlstreamcdata, <<"before">>})),
        "" = os:cmd("kill -STOP " ++ OsPid),
        Chunk = {xmlstreamcdata, binary:copy(<<"x">>, 1 bsl 20)},
        %% Loopback's socket buffers and the link's own (1 MiB by default)
        %% fill within tens of MiB.
        ?assertEqual({error, overloaded}, fill(Socket, Chunk, 500)),
        "" = os:cmd("kill -CONT " ++ OsPid),
        %% A call over the same link returns only once what was queued
        %% before it has been taken off the link.
        ?assert(erpc:call(PeerNode, erlang, garbage_collect, [], 60000)),
        ?assertEqual({error, overloaded},
                     megaphone_c2s_socket:send_xml(Socket, {xmlstreamcdata, <<"after">>})),
        ?assertEqual(ok, megaphone_c2s_socket:send_xml(Other, {xmlstreamcdata, <<"after">>}))
    after
        os:cmd("kill -CONT " ++ OsPid),
        application:unset_env(megaphone, send_busy_timeout),
        peer:stop(Peer),
        StartedDist andalso net_kernel:stop()
    end.

%% Writes Chunk until a write fails, at most Limit times.
fill(_Socket, _Chunk, 0) -> no_failure;
fill(Socket, Chunk, Limit) ->
    case megaphone_c2s_socket:send_xml(Socket, Chunk) of
        ok -> fill(Socket, Chunk, Limit - 1);
        Failed -> Failed
    end.

%% peer needs this node to be distributed; eunit's node may not be.
ensure_distributed() ->
    case node() of
        nonode@nohost ->
            _ = os:cmd("epmd -daemon"),
            {ok, _} = net_kernel:start([list_to_atom("megaphone_eunit_" ++ os:getpid()), shortnames]),
            true;
        _ ->
            false
    end.
