%% @doc The port carrier: runs a sidecar as an Erlang port, for sites that
%% want no distribution link, and stands in for the sidecar's node.
%%
%% The sidecar speaks the same bridge protocol as over the distribution:
%% its frames are distribution frames (the pass-through byte 112, a control
%% message, a payload) inside {packet, 4} packets on its stdin/stdout. This
%% process is the sidecar's one process as ejabberd sees it: the sidecar's
%% hello names this pid, sessions and c2s processes monitor it, and
%% everything sent to it goes down the port. What the sidecar sends comes
%% up as SEND (to a pid), REG_SEND (to megaphone_listener) and MONITOR_P /
%% DEMONITOR_P, which this process carries out for it.
%%
%% When the sidecar exits this process exits too, so everything that
%% monitors it ends as it would when a sidecar node goes down; its
%% supervisor (megaphone_port_sup) starts a fresh one, which waits a
%% moment before starting the sidecar again.
%%
%% Frames are decoded as the distribution decodes them: the sidecar's own
%% atoms (the protocol's, a fixed set) may be new to this node, as they
%% may be over a distribution link, and client data never travels as an
%% atom (the sidecar sends JIDs, names and addresses as binaries; the
%% hostile-input tests assert the node's atom count does not move).
-module(megaphone_port).
-behaviour(gen_server).

-export([start_link/2, os_pid/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

%% Distribution control message operations the sidecar sends.
-define(SEND, 2).
-define(REG_SEND, 6).
-define(MONITOR_P, 19).
-define(DEMONITOR_P, 20).
-define(MONITOR_P_EXIT, 21).
-define(SEND_SENDER, 22).
-define(PASS_THROUGH, 112).
%% The sidecar ticks when idle; so do we, well inside its silence limit.
-define(TICK_MS, 15000).
%% A restarted sidecar waits this long, so a binary that exits at once
%% does not spin.
-define(START_DELAY_MS, 1000).

-record(state, {path :: file:filename_all(),
                args :: [string()],
                port :: port() | undefined,
                %% our monitor => the sidecar's own reference for it
                monitors = #{} :: #{reference() => {pid(), term()}},
                %% the sidecar's reference => our monitor
                by_ref = #{} :: #{term() => reference()}}).

-spec start_link(file:filename_all(), [string()]) -> {ok, pid()} | {error, term()}.
start_link(Path, Args) ->
    gen_server:start_link(?MODULE, {Path, Args}, []).

%% @doc The sidecar's OS process id, once it runs.
-spec os_pid(pid()) -> {ok, non_neg_integer()} | {error, not_running}.
os_pid(Carrier) ->
    gen_server:call(Carrier, os_pid).

-spec init({file:filename_all(), [string()]}) -> {ok, #state{}}.
init({Path, Args}) ->
    process_flag(trap_exit, true),
    erlang:send_after(?START_DELAY_MS, self(), open_port),
    {ok, #state{path = Path, args = Args}}.

-spec handle_call(term(), gen_server:from(), #state{}) -> {reply, term(), #state{}}.
handle_call(os_pid, _From, #state{port = Port} = State) when is_port(Port) ->
    case erlang:port_info(Port, os_pid) of
        {os_pid, OsPid} -> {reply, {ok, OsPid}, State};
        undefined -> {reply, {error, not_running}, State}
    end;
handle_call(os_pid, _From, State) ->
    {reply, {error, not_running}, State};
handle_call(_Request, _From, State) ->
    {reply, {error, unknown_call}, State}.

-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast(_Msg, State) ->
    {noreply, State}.

-spec handle_info(term(), #state{}) -> {noreply, #state{}} | {stop, term(), #state{}}.
handle_info(open_port, #state{path = Path, args = Args} = State) ->
    Port = open_port({spawn_executable, Path},
                     [{packet, 4}, binary, exit_status, use_stdio,
                      {args, ["--carrier", "port" | Args]}]),
    port_command(Port, term_to_binary({megaphone_port, self(), node()})),
    erlang:send_after(?TICK_MS, self(), tick),
    logger:notice("megaphone: started sidecar ~ts on a port", [Path]),
    {noreply, State#state{port = Port}};
handle_info(tick, #state{port = Port} = State) ->
    port_command(Port, <<>>),
    erlang:send_after(?TICK_MS, self(), tick),
    {noreply, State};
handle_info({Port, {data, <<>>}}, #state{port = Port} = State) ->
    {noreply, State};   % the sidecar's tick
handle_info({Port, {data, <<?PASS_THROUGH, Frame/binary>>}}, #state{port = Port} = State) ->
    try decode(Frame) of
        {Control, Payload} -> {noreply, control(Control, Payload, State)}
    catch error:_ ->
            logger:error("megaphone: undecodable frame from the port sidecar; restarting it"),
            {stop, bad_frame, State}
    end;
handle_info({Port, {exit_status, Status}}, #state{port = Port} = State) ->
    logger:warning("megaphone: the port sidecar exited with status ~p", [Status]),
    {stop, {sidecar_exited, Status}, State#state{port = undefined}};
handle_info({'EXIT', Port, Reason}, #state{port = Port} = State) ->
    {stop, {port_closed, Reason}, State#state{port = undefined}};
handle_info({'DOWN', MRef, process, Pid, Reason}, #state{monitors = Monitors} = State)
  when is_map_key(MRef, Monitors) ->
    {{From, Ref}, Rest} = maps:take(MRef, Monitors),
    to_port(State, {?MONITOR_P_EXIT, Pid, From, Ref, Reason}, undefined),
    {noreply, State#state{monitors = Rest, by_ref = maps:remove(Ref, State#state.by_ref)}};
handle_info({'EXIT', _From, _Reason}, State) ->
    {noreply, State};
handle_info(Msg, #state{port = Port} = State) when is_port(Port) ->
    %% Anything else was sent to the sidecar's process: pass it down.
    to_port(State, {?SEND, '', self()}, Msg),
    {noreply, State};
handle_info(_Msg, State) ->
    {noreply, State}.   % before the port is open there is no sidecar yet

-spec terminate(term(), #state{}) -> ok.
terminate(_Reason, #state{port = Port}) when is_port(Port) ->
    catch port_close(Port),
    ok;
terminate(_Reason, _State) ->
    ok.

%% A frame is the control message and, for sends, the payload after it.
decode(Frame) ->
    {Control, Used} = binary_to_term(Frame, [used]),
    case byte_size(Frame) - Used of
        0 -> {Control, none};
        _ ->
            <<_:Used/binary, Rest/binary>> = Frame,
            {Control, binary_to_term(Rest)}
    end.

control({Op, _, To}, Msg, State)
  when Op =:= ?SEND orelse Op =:= ?SEND_SENDER, is_pid(To), Msg =/= none ->
    _ = erlang:send(To, Msg, [noconnect]),
    State;
control({?REG_SEND, _From, _, megaphone_listener}, Msg, State) when Msg =/= none ->
    %% The only name a sidecar ever sends to.
    _ = catch megaphone_listener ! Msg,
    State;
control({?MONITOR_P, From, To, Ref}, none, #state{} = State) when is_pid(To) ->
    MRef = erlang:monitor(process, To),
    State#state{monitors = (State#state.monitors)#{MRef => {From, Ref}},
                by_ref = (State#state.by_ref)#{Ref => MRef}};
control({?DEMONITOR_P, _From, _To, Ref}, none, #state{by_ref = ByRef} = State) ->
    case maps:take(Ref, ByRef) of
        {MRef, Rest} ->
            erlang:demonitor(MRef, [flush]),
            State#state{by_ref = Rest, monitors = maps:remove(MRef, State#state.monitors)};
        error ->
            State
    end;
control(Control, _Msg, State) ->
    %% Links, unlinks, group leaders: nothing a port sidecar needs.
    logger:debug("megaphone: port sidecar control message ignored: ~P", [Control, 5]),
    State.

to_port(#state{port = Port}, Control, Payload) ->
    Tail = case Payload of
               undefined -> <<>>;
               _ -> term_to_binary(Payload)
           end,
    port_command(Port, [?PASS_THROUGH, term_to_binary(Control), Tail]).
