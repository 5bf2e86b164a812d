%% @doc One attached sidecar. It monitors the sidecar's process, runs every
%% BOSH request the sidecar sends in a worker of its own (megaphone_bosh),
%% and when the sidecar goes away (its node disconnects or it says goodbye)
%% it kills the workers still in flight and stops: nothing it started
%% outlives it. BOSH sessions themselves belong to ejabberd_bosh and live on
%% for their inactivity window, so a sidecar back in time picks them up.
-module(megaphone_sidecar).
-behaviour(gen_server).

-export([start_link/3, status/1, control/2, c2s_of/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

%% Connection and request ids are the sidecar's 64-bit unsigned integers.
-define(IS_ID(X), (is_integer(X) andalso X >= 0 andalso X =< 16#FFFFFFFFFFFFFFFF)).
%% The messages only the sidecar sends a session.
-define(IS_SIDECAR_MSG(M), (is_tuple(M) andalso tuple_size(M) >= 2 andalso
                            (element(1, M) =:= bosh_request orelse element(1, M) =:= bosh_cancel orelse
                             element(1, M) =:= c2s_open orelse element(1, M) =:= sidecar_draining))).
%% From protocol version 3 the welcome carries a secret and the sidecar
%% wraps each of its messages as {from_sidecar, Token, Msg}.
-define(TOKEN_VERSION, 3).
-define(TOKEN_BYTES, 16).
%% How many times a fresh c2s is looked at for its login collection.
-define(LOGIN_GC_LOOKS, 10).
%% A c2s counts as idle between two looks if its reductions moved by less
%% than this: looking costs the looked-at process a few (process_info is a
%% signal it serves), handling any stanza thousands.
-define(IDLE(Before, Now), (Now - Before < 100)).

-record(state, {
          sidecar :: pid(),
          monitor :: reference(),
          version :: pos_integer(),
          %% The secret the sidecar echoes (version 3 on), or undefined.
          token :: binary() | undefined,
          logcap = megaphone_logcap:new() :: megaphone_logcap:cap(),
          ignored = 0 :: non_neg_integer(),
          info :: map(),
          started :: integer(),                          % erlang:system_time(second)
          workers = #{} :: #{reference() => {non_neg_integer(), non_neg_integer(), pid()}},
          by_request = #{} :: #{{non_neg_integer(), non_neg_integer()} => reference()},
          %% The last worker started for each BOSH session (by sid) while
          %% it runs, and the sid of each such worker: the next request of
          %% the session waits for it to reach ejabberd_bosh first
          %% (megaphone_bosh:wait_handed_over/2).
          last_of_session = #{} :: #{binary() => reference()},
          session_of = #{} :: #{reference() => {binary(), pid()}},
          requests = 0 :: non_neg_integer(),
          streams = 0 :: non_neg_integer(),
          %% Live c2s processes, by monitor, with their reductions at the
          %% last sweep (a c2s whose count has barely moved is idle) and
          %% the sidecar's connection id.
          c2s = #{} :: #{reference() => {pid(), non_neg_integer(), non_neg_integer()}},
          %% c2s processes started lately, still logging in: their
          %% reductions at the last look, at the last collection, and how
          %% many more looks they get (see login_gc/1).
          fresh = #{} :: #{reference() => {non_neg_integer(), non_neg_integer(), non_neg_integer()}},
          fresh_timer = false :: boolean(),
          draining = false :: boolean(),
          swept = 0 :: non_neg_integer(),
          login_collected = 0 :: non_neg_integer(),
          cancelled = 0 :: non_neg_integer(),
          failed = 0 :: non_neg_integer()}).

-spec start_link(pid(), pos_integer(), map()) -> {ok, pid()} | {error, term()}.
start_link(Sidecar, Version, Info) ->
    gen_server:start_link(?MODULE, {Sidecar, Version, Info}, []).

%% @doc A map describing this session, for megaphone:status().
-spec status(pid()) -> map().
status(Session) ->
    gen_server:call(Session, status, 1000).

%% @doc Sends an operator's command to a sidecar; it answers the caller
%% with {megaphone_reply, Ref, Result}. See docs/PROTOCOL.md.
-spec control(pid(), term()) -> reference().
control(Sidecar, Command) ->
    Ref = make_ref(),
    erlang:send(Sidecar, {megaphone_control, self(), Ref, Command}, [noconnect]),
    Ref.

%% @doc The c2s process this session started for a connection, if alive.
-spec c2s_of(pid(), non_neg_integer()) -> pid() | undefined.
c2s_of(Session, ConnId) ->
    try gen_server:call(Session, {c2s_of, ConnId}, 1000)
    catch exit:_ -> undefined
    end.

-spec init({pid(), pos_integer(), map()}) -> {ok, #state{}}.
init({Sidecar, Version, Info}) ->
    Ref = erlang:monitor(process, Sidecar),
    Token = case Version >= ?TOKEN_VERSION of
                true -> crypto:strong_rand_bytes(?TOKEN_BYTES);
                false -> undefined
            end,
    State = #state{sidecar = Sidecar, monitor = Ref, version = Version, token = Token,
                   info = maps:with([name, build, min_version], Info),
                   started = erlang:system_time(second)},
    welcome(State),
    schedule_sweep(),
    logger:notice("megaphone: sidecar ~p attached (~ts), protocol ~p",
                  [Sidecar, maps:get(name, Info, <<"?">>), Version]),
    {ok, State}.

-spec handle_call(term(), gen_server:from(), #state{}) -> {reply, term(), #state{}}.
handle_call(status, _From, State) ->
    {reply, describe(State), State};
handle_call({c2s_of, ConnId}, _From, #state{c2s = C2S} = State) ->
    Found = [Pid || {Pid, _, Id} <- maps:values(C2S), Id =:= ConnId],
    {reply, case Found of [P | _] -> P; [] -> undefined end, State};
handle_call(_Request, _From, State) ->
    {reply, {error, unknown_call}, State}.

-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast(_Msg, State) ->
    {noreply, State}.

-spec handle_info(term(), #state{}) -> {noreply, #state{}} | {noreply, #state{}, hibernate} | {stop, normal, #state{}}.
handle_info({from_sidecar, Token, Msg}, #state{token = Token} = State) when is_binary(Token) ->
    from_sidecar(Msg, State);
handle_info({from_sidecar, _, _} = Msg, State) ->
    {noreply, ignore(wrong_token, Msg, State)};
handle_info(Msg, #state{token = undefined} = State) when ?IS_SIDECAR_MSG(Msg) ->
    from_sidecar(Msg, State);    % versions 1 and 2: nothing to check it by
handle_info(Msg, State) when ?IS_SIDECAR_MSG(Msg) ->
    {noreply, ignore(no_token, Msg, State)};
handle_info({'DOWN', Ref, process, _, Reason}, #state{monitor = Ref} = State) ->
    logger:notice("megaphone: sidecar ~p went away (~p); ending ~p request(s) in flight",
                  [State#state.sidecar, Reason, maps:size(State#state.workers)]),
    {stop, normal, State};
handle_info({'DOWN', Ref, process, _, _Reason}, #state{c2s = C2S} = State)
  when is_map_key(Ref, C2S) ->
    {noreply, State#state{c2s = maps:remove(Ref, C2S), fresh = maps:remove(Ref, State#state.fresh)}};
handle_info(sweep, State) ->
    schedule_sweep(),
    %% The sweep rebuilds the c2s map, and with thousands of streams the
    %% garbage of those rebuilds grew this process to ~1 KiB a stream
    %% (BENCH.md, 2026-12-02). Hibernating compacts it to what it holds.
    {noreply, sweep(State), hibernate};
handle_info({garbage_collect, megaphone_sweep, _}, State) ->
    {noreply, State};
handle_info(login_gc, State) ->
    {noreply, schedule_login_gc(login_gc(State#state{fresh_timer = false}))};
handle_info({garbage_collect, {login_gc, Ref}, _}, State) ->
    {noreply, login_collected(Ref, State)};
handle_info({'DOWN', Ref, process, _, Reason}, #state{workers = Workers} = State) ->
    case maps:take(Ref, Workers) of
        {{ConnId, ReqId, _Pid}, Rest} ->
            State1 = worker_gone(Ref, State#state{workers = Rest,
                                                  by_request = maps:remove({ConnId, ReqId}, State#state.by_request)}),
            {noreply, worker_ended(ConnId, ReqId, Reason, State1)};
        error ->
            {noreply, State}
    end;
handle_info(rewelcome, State) ->
    welcome(State),
    {noreply, State};
handle_info(Other, State) ->
    {noreply, ignore(unknown, Other, State)}.

%% A message of the sidecar's (its token checked, where there is one).
from_sidecar({bosh_request, ConnId, ReqId, Peer, Body}, State)
  when ?IS_ID(ConnId), ?IS_ID(ReqId), is_binary(Body) ->
    case megaphone_bosh:valid_peer(Peer) of
        true -> {noreply, start_worker(ConnId, ReqId, Peer, Body, State)};
        false -> {noreply, reject(ConnId, ReqId, <<"bad peer address">>, State)}
    end;
from_sidecar({c2s_open, ConnId, Transport, Peer, Local}, State) when ?IS_ID(ConnId) ->
    {noreply, open_c2s(ConnId, Transport, Peer, Local, State)};
from_sidecar({bosh_cancel, ConnId, ReqId}, #state{by_request = ByReq} = State) ->
    case maps:find({ConnId, ReqId}, ByReq) of
        {ok, Ref} ->
            {_, _, Pid} = maps:get(Ref, State#state.workers),
            exit(Pid, kill),
            {noreply, State#state{cancelled = State#state.cancelled + 1}};
        error ->
            {noreply, State}
    end;
from_sidecar({sidecar_draining, On}, State) when is_boolean(On) ->
    logger:notice("megaphone: sidecar ~p ~ts", [State#state.sidecar,
                                               case On of true -> "is draining: it takes no new connections";
                                                          false -> "takes new connections again" end]),
    {noreply, State#state{draining = On}};
from_sidecar(Other, State) ->
    {noreply, ignore(malformed, Other, State)}.

%% Drops a message that is not the sidecar's, or not one it may send,
%% with a line in the log; at most one per reason every 10 s, so a flood
%% costs no more than the messages themselves.
ignore(Why, Msg, #state{logcap = Cap, ignored = N} = State) ->
    case megaphone_logcap:check(Why, Cap) of
        {log, Skipped, Cap1} ->
            logger:warning("megaphone: session ~p (sidecar ~p) ignored a message: ~ts: ~P"
                           " (~p more like it not logged)",
                           [self(), State#state.sidecar, why(Why), Msg, 6, Skipped]),
            State#state{logcap = Cap1, ignored = N + 1};
        {skip, Cap1} ->
            State#state{logcap = Cap1, ignored = N + 1}
    end.

why(wrong_token) -> "its token is not this session's";
why(no_token) -> "a sidecar message without the token its protocol version requires";
why(malformed) -> "a malformed sidecar message";
why(unknown) -> "not a message of the protocol".

-spec terminate(term(), #state{}) -> ok.
terminate(_Reason, #state{workers = Workers}) ->
    %% Whatever the reason we stop, no request process outlives us.
    maps:foreach(fun(_, {_, _, Pid}) -> exit(Pid, kill) end, Workers).

welcome(#state{sidecar = Sidecar, version = Version, token = Token}) ->
    Info0 = #{node => atom_to_binary(node(), utf8),
              otp_release => list_to_binary(erlang:system_info(otp_release)),
              ejabberd => ejabberd_version()},
    Info = case Token of
               undefined -> Info0;
               _ -> Info0#{token => Token}
           end,
    erlang:send(Sidecar, {megaphone_welcome, self(), Version, Info}, [noconnect]).

ejabberd_version() ->
    case application:get_key(ejabberd, vsn) of
        {ok, Vsn} -> list_to_binary(Vsn);
        undefined -> <<"not running">>
    end.

start_worker(ConnId, ReqId, Peer, Body, #state{sidecar = Sidecar, last_of_session = Last,
                                                session_of = Of} = State) ->
    Sid = megaphone_bosh:session_id(Body),
    Prev = case maps:find(Sid, Last) of
               {ok, PrevRef} -> element(2, maps:get(PrevRef, Of));
               error -> none
           end,
    {Pid, Ref} = megaphone_bosh:start(Sidecar, ConnId, ReqId, Peer, Body, Prev),
    State1 = case Sid of
                 none -> State;
                 _ -> State#state{last_of_session = Last#{Sid => Ref}, session_of = Of#{Ref => {Sid, Pid}}}
             end,
    State1#state{workers = (State#state.workers)#{Ref => {ConnId, ReqId, Pid}},
                 by_request = (State#state.by_request)#{{ConnId, ReqId} => Ref},
                 requests = State#state.requests + 1}.

%% Forgets a worker that ended as its session's last one.
worker_gone(Ref, #state{last_of_session = Last, session_of = Of} = State) ->
    case maps:take(Ref, Of) of
        {{Sid, _}, Of1} ->
            Last1 = case Last of
                        #{Sid := Ref} -> maps:remove(Sid, Last);
                        _ -> Last
                    end,
            State#state{last_of_session = Last1, session_of = Of1};
        error ->
            State
    end.

worker_ended(_ConnId, _ReqId, normal, State) ->
    State;
worker_ended(_ConnId, _ReqId, killed, State) ->
    State;   % cancelled by the sidecar: it no longer waits for an answer
worker_ended(ConnId, ReqId, Reason, State) ->
    logger:error("megaphone: BOSH request ~p/~p crashed: ~p", [ConnId, ReqId, Reason]),
    reject(ConnId, ReqId, <<"Internal Server Error">>, State#state{failed = State#state.failed + 1}).

%% A client stream (TCP, TLS, WebSocket, or a BOSH session the sidecar
%% serves at the edge) the sidecar has framed: start
%% ejabberd_c2s on a virtual socket in element mode. accept/1 is cast
%% before the sidecar hears of the pid, so nothing of the sidecar's can
%% reach c2s before it has taken its socket.
open_c2s(ConnId, TransportBin, Peer, Local, #state{sidecar = Sidecar} = State) ->
    Reply = case {transport(TransportBin), megaphone_bosh:valid_peer(Peer),
                  megaphone_bosh:valid_peer(Local)} of
                {{ok, Transport}, true, true} ->
                    Socket = megaphone_c2s_socket:new(Sidecar, ConnId, Transport, Peer, Local),
                    start_c2s(ConnId, Socket);
                _ ->
                    {c2s_refused, ConnId, <<"bad c2s_open">>}
            end,
    erlang:send(Sidecar, Reply, [noconnect]),
    case Reply of
        {c2s_started, _, Pid, _} ->
            Ref = erlang:monitor(process, Pid),
            schedule_login_gc(State#state{streams = State#state.streams + 1,
                                          c2s = (State#state.c2s)#{Ref => {Pid, 0, ConnId}},
                                          fresh = (State#state.fresh)#{Ref => {0, 0, ?LOGIN_GC_LOOKS}}});
        _ ->
            State
    end.

%% Idle c2s processes never garbage-collect on their own: measured, one
%% sits at ~60 KB where a collection brings it to ~5 KB (BENCH.md). Every
%% sweep interval the session asks each c2s that has done no work since
%% the last sweep to collect, asynchronously, so the session never waits.
schedule_sweep() ->
    case application:get_env(megaphone, gc_sweep_interval, 60000) of
        Ms when is_integer(Ms), Ms > 0 -> erlang:send_after(Ms, self(), sweep);
        _ -> ok   % 0 or anything else: sweeping is off
    end.

sweep(#state{c2s = C2S} = State) ->
    {C2S1, Swept} =
        maps:fold(
          fun(Ref, {Pid, Last, Id}, {Acc, N}) ->
                  case erlang:process_info(Pid, [reductions, message_queue_len]) of
                      [{reductions, Now}, {message_queue_len, 0}] when ?IDLE(Last, Now) ->
                          erlang:garbage_collect(Pid, [{async, megaphone_sweep}]),
                          {Acc#{Ref => {Pid, Now, Id}}, N + 1};
                      [{reductions, Now}, _] ->
                          {Acc#{Ref => {Pid, Now, Id}}, N};
                      undefined ->
                          {Acc, N}
                  end
          end, {#{}, 0}, C2S),
    State#state{c2s = C2S1, swept = State#state.swept + Swept}.

%% A c2s grows to 60-90 KiB while its client logs in, and an idle process
%% never collects, so left to the sweep a login burst piles up a minute of
%% logins' garbage: memory beam keeps mapped long after (BENCH.md). So
%% every login_gc_interval each fresh c2s is looked at, and one that did
%% work since its last collection but none since the last look (its
%% client is done for now, between or after the login's round trips) is
%% collected at once. After ?LOGIN_GC_LOOKS looks it is left to the sweep.
schedule_login_gc(#state{fresh_timer = false, fresh = Fresh} = State) when map_size(Fresh) > 0 ->
    case application:get_env(megaphone, login_gc_interval, 1000) of
        Ms when is_integer(Ms), Ms > 0 ->
            erlang:send_after(Ms, self(), login_gc),
            State#state{fresh_timer = true};
        _ ->
            State#state{fresh = #{}}    % 0 or anything else: off
    end;
schedule_login_gc(State) ->
    State.

login_gc(#state{c2s = C2S, fresh = Fresh} = State) ->
    {Fresh1, Collected} =
        maps:fold(
          fun(Ref, {Last, AtGC, Looks}, {Acc, N}) ->
                  %% The sweep drops a dead c2s before its 'DOWN' arrives.
                  Pid = case maps:find(Ref, C2S) of {ok, {P, _, _}} -> P; error -> gone end,
                  case is_pid(Pid) andalso erlang:process_info(Pid, [reductions, message_queue_len]) of
                      [{reductions, Now}, {message_queue_len, 0}] when ?IDLE(Last, Now), not ?IDLE(AtGC, Now) ->
                          erlang:garbage_collect(Pid, [{async, {login_gc, Ref}}]),
                          {keep_fresh(Ref, {Now, Now, Looks - 1}, Acc), N + 1};
                      [{reductions, Now}, _] ->
                          {keep_fresh(Ref, {Now, AtGC, Looks - 1}, Acc), N};
                      _ ->    % ended
                          {Acc, N}
                  end
          end, {#{}, 0}, Fresh),
    State#state{fresh = Fresh1, login_collected = State#state.login_collected + Collected}.

keep_fresh(_Ref, {_, _, 0}, Acc) -> Acc;
keep_fresh(Ref, Entry, Acc) -> Acc#{Ref => Entry}.

%% A collection counts as work in the collected process's reductions, so
%% once it is done they are read again: only the client's work after it
%% makes the c2s due for another.
login_collected(Ref, #state{c2s = C2S, fresh = Fresh} = State) ->
    case {maps:find(Ref, Fresh), maps:find(Ref, C2S)} of
        {{ok, {_, _, Looks}}, {ok, {Pid, _, _}}} ->
            case erlang:process_info(Pid, reductions) of
                {reductions, Now} -> State#state{fresh = Fresh#{Ref => {Now, Now, Looks}}};
                undefined -> State
            end;
        _ ->
            State
    end.

start_c2s(ConnId, Socket) ->
    try
        Opts = ejabberd_c2s_config:get_c2s_limits(),
        case ejabberd_c2s:start(megaphone_c2s_socket, Socket, Opts) of
            {ok, Pid} ->
                ejabberd_c2s:accept(Pid),
                MaxStanza = proplists:get_value(max_stanza_size, Opts, infinity),
                {c2s_started, ConnId, Pid, #{max_stanza_size => MaxStanza}};
            Other ->
                logger:warning("megaphone: c2s for connection ~p did not start: ~p", [ConnId, Other]),
                {c2s_refused, ConnId, <<"c2s did not start">>}
        end
    catch
        error:undef -> {c2s_refused, ConnId, <<"ejabberd is not running">>}
    end.

%% The transport comes as a binary, never an atom, and maps to one of the
%% atoms get_transport/1 may return.
transport(<<"tcp">>) -> {ok, tcp};
transport(<<"tls">>) -> {ok, tls};
transport(<<"websocket">>) -> {ok, websocket};
%% A BOSH session the sidecar serves itself (--bosh-mode edge): c2s runs
%% as it does under ejabberd_bosh (its session shows as http_bind).
transport(<<"http_bind">>) -> {ok, http_bind};
transport(_) -> error.

reject(ConnId, ReqId, Reason, #state{sidecar = Sidecar} = State) ->
    erlang:send(Sidecar, megaphone_bosh:error_response(ConnId, ReqId, 500, Reason), [noconnect]),
    State.

describe(#state{} = S) ->
    #{sidecar => S#state.sidecar,
      session => self(),
      draining => S#state.draining,
      node => node(S#state.sidecar),
      name => maps:get(name, S#state.info, <<>>),
      build => maps:get(build, S#state.info, <<>>),
      protocol => S#state.version,
      uptime_s => erlang:system_time(second) - S#state.started,
      in_flight => maps:size(S#state.workers),
      requests => S#state.requests,
      streams_opened => S#state.streams,
      streams => maps:size(S#state.c2s),
      gc_swept => S#state.swept,
      gc_login => S#state.login_collected,
      cancelled => S#state.cancelled,
      ignored => S#state.ignored,
      failed => S#state.failed}.
