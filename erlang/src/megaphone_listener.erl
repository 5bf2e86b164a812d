%% @doc Takes sidecars' hellos. Registered as megaphone_listener on the
%% ejabberd node: it is the only name a sidecar ever sends to. It agrees a
%% protocol version, starts a megaphone_sidecar session for the sidecar, and
%% from then on the sidecar talks to that session directly.
%%
%% It never calls out synchronously except to start a session (and to ask
%% the local port supervisor whether a local hello is its carrier's), so a
%% slow or dead sidecar cannot stall it.
%%
%% It is the trust boundary's front door (docs/ARCHITECTURE.md, "Trust
%% boundary"): a hello is taken only from a sidecar's place, a hidden node
%% the operator allows (app env allowed_sidecars: node-name patterns, `*'
%% for any run of characters; unset, any hidden node) or a port carrier of
%% this node. Never from a visible cluster peer (another ejabberd is no
%% sidecar) nor from any other local process.
-module(megaphone_listener).
-behaviour(gen_server).

-export([start_link/0, supported_versions/0, choose_version/2]).
-export([classify/1, admit/3, name_matches/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(VERSIONS, [1, 2, 3]).

-record(state, {sessions = #{} :: #{pid() => pid()}, % sidecar => session
                logcap = megaphone_logcap:new() :: megaphone_logcap:cap()}).

%% Where a hello comes from, as far as the trust boundary cares.
-type origin() :: port_carrier | local | hidden | visible | unconnected.

-spec start_link() -> {ok, pid()} | ignore | {error, term()}.
start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc The protocol versions this shim speaks.
-spec supported_versions() -> [pos_integer()].
supported_versions() -> ?VERSIONS.

%% @doc The newest version both sides speak, given the sidecar's range.
-spec choose_version(integer(), integer()) -> {ok, pos_integer()} | error.
choose_version(Min, Max) ->
    case [V || V <- ?VERSIONS, V >= Min, V =< Max] of
        [] -> error;
        Common -> {ok, lists:max(Common)}
    end.

-spec init([]) -> {ok, #state{}}.
init([]) ->
    process_flag(trap_exit, true),
    {ok, #state{}}.

-spec handle_call(term(), gen_server:from(), #state{}) -> {reply, term(), #state{}}.
handle_call(sessions, _From, #state{sessions = Sessions} = State) ->
    {reply, maps:values(Sessions), State};
handle_call(_Request, _From, State) ->
    {reply, {error, unknown_call}, State}.

-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast(_Msg, State) ->
    {noreply, State}.

-spec handle_info(term(), #state{}) -> {noreply, #state{}}.
handle_info({megaphone_hello, Sidecar, Version, Info}, State)
  when is_pid(Sidecar), is_integer(Version), is_map(Info) ->
    {noreply, hello(Sidecar, Version, Info, State)};
handle_info({'DOWN', _Ref, process, Session, _Reason}, #state{sessions = Sessions} = State) ->
    {noreply, State#state{sessions = maps:filter(fun(_, S) -> S =/= Session end, Sessions)}};
handle_info(Other, #state{logcap = Cap} = State) ->
    %% Anything else is noise or an attack: note it, never crash on it.
    case megaphone_logcap:check(no_hello, Cap) of
        {log, Skipped, Cap1} ->
            logger:notice("megaphone: listener ignored a message that is no hello: ~P"
                          " (~p more not logged)", [Other, 8, Skipped]),
            {noreply, State#state{logcap = Cap1}};
        {skip, Cap1} ->
            {noreply, State#state{logcap = Cap1}}
    end.

hello(Sidecar, Version, Info, State) ->
    NodeBin = atom_to_binary(node(Sidecar), utf8),
    case admit(classify(Sidecar), NodeBin, application:get_env(megaphone, allowed_sidecars)) of
        ok ->
            negotiate(Sidecar, Version, Info, State);
        {refused, Reason} ->
            refuse(Sidecar, Reason, NodeBin, State)
    end.

%% @doc Where a hello's pid lives. Only a hidden node (a sidecar joins as
%% one) and this node's port carriers can be sidecars.
-spec classify(pid()) -> origin().
classify(Pid) when node(Pid) =:= node() ->
    case is_port_carrier(Pid) of
        true -> port_carrier;
        false -> local
    end;
classify(Pid) ->
    Node = node(Pid),
    case {lists:member(Node, nodes(hidden)), lists:member(Node, nodes(visible))} of
        {true, _} -> hidden;
        {_, true} -> visible;
        _ -> unconnected      % relayed by someone else: no sidecar's own hello
    end.

is_port_carrier(Pid) ->
    try lists:keymember(Pid, 2, megaphone_port_sup:ports())
    catch exit:_ -> false
    end.

%% @doc The allowlist's verdict on a hello from Origin, whose node is
%% NodeBin, under the allowed_sidecars setting ({ok, Patterns} or
%% undefined: any hidden node). A port carrier is the operator's own
%% doing (megaphone:start_port/2) and needs no pattern. allow_local_sidecars
%% lets any local process in, for tests and embedding only.
-spec admit(origin(), binary(), {ok, term()} | undefined) -> ok | {refused, binary()}.
admit(port_carrier, _, _) -> ok;
admit(local, _, _) ->
    case application:get_env(megaphone, allow_local_sidecars, false) of
        true -> ok;
        _ -> {refused, <<"a local process is no sidecar">>}
    end;
admit(visible, _, _) -> {refused, <<"a visible cluster node is no sidecar">>};
admit(unconnected, _, _) -> {refused, <<"the hello did not come from its sender's node">>};
admit(hidden, _, undefined) -> ok;
admit(hidden, NodeBin, {ok, Patterns}) when is_list(Patterns) ->
    case lists:any(fun(P) -> name_matches(pattern(P), NodeBin) end, Patterns) of
        true -> ok;
        false -> {refused, <<"this sidecar node is not in allowed_sidecars">>}
    end;
admit(hidden, _, {ok, _}) -> {refused, <<"allowed_sidecars is not a list">>}.

pattern(P) when is_binary(P) -> P;
pattern(P) when is_list(P) ->
    case unicode:characters_to_binary(P) of
        B when is_binary(B) -> B;
        _ -> <<>>
    end;
pattern(P) when is_atom(P) -> atom_to_binary(P, utf8);
pattern(_) -> <<>>.   % matches no node name

%% @doc Whether a node name matches a pattern in which `*' stands for any
%% run of characters (none included) and everything else for itself.
-spec name_matches(binary(), binary()) -> boolean().
name_matches(<<>>, <<>>) -> true;
name_matches(<<"*", Rest/binary>>, Name) ->
    name_matches(Rest, Name) orelse
        (Name =/= <<>> andalso name_matches(<<"*", Rest/binary>>, binary_part(Name, 1, byte_size(Name) - 1)));
name_matches(<<C, Rest/binary>>, <<C, NameRest/binary>>) -> name_matches(Rest, NameRest);
name_matches(_, _) -> false.

refuse(Sidecar, Reason, NodeBin, #state{logcap = Cap} = State) ->
    erlang:send(Sidecar, {megaphone_refused, Reason, ?VERSIONS}, [noconnect]),
    case megaphone_logcap:check({refused, NodeBin}, Cap) of
        {log, Skipped, Cap1} ->
            logger:warning("megaphone: refused a hello from ~p on ~ts: ~ts (~p more refusals of it not logged)",
                           [Sidecar, NodeBin, Reason, Skipped]),
            State#state{logcap = Cap1};
        {skip, Cap1} ->
            State#state{logcap = Cap1}
    end.

negotiate(Sidecar, Version, Info, #state{sessions = Sessions} = State) ->
    Min = case maps:get(min_version, Info, Version) of
              M when is_integer(M) -> M;
              _ -> Version
          end,
    case {choose_version(Min, Version), maps:find(Sidecar, Sessions)} of
        {error, _} ->
            Reason = iolist_to_binary(io_lib:format("no common protocol version (it speaks ~p..~p)",
                                                    [Min, Version])),
            refuse(Sidecar, Reason, atom_to_binary(node(Sidecar), utf8), State);
        {{ok, _}, {ok, Session}} ->
            %% A repeated hello (the welcome was lost, or the sidecar
            %% timed out waiting): the existing session welcomes it again.
            Session ! rewelcome,
            State;
        {{ok, Chosen}, error} ->
            case megaphone_sidecar_sup:start_session(Sidecar, Chosen, Info) of
                {ok, Session} ->
                    erlang:monitor(process, Session),
                    State#state{sessions = Sessions#{Sidecar => Session}};
                {error, Reason} ->
                    logger:error("megaphone: cannot start a session for ~p: ~p", [Sidecar, Reason]),
                    State
            end
    end.
