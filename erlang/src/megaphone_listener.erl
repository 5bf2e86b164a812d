%% @doc Takes sidecars' hellos. Registered as megaphone_listener on the
%% ejabberd node: it is the only name a sidecar ever sends to. It agrees a
%% protocol version, starts a megaphone_sidecar session for the sidecar, and
%% from then on the sidecar talks to that session directly.
%%
%% It never calls out synchronously except to start a session, so a slow or
%% dead sidecar cannot stall it.
-module(megaphone_listener).
-behaviour(gen_server).

-export([start_link/0, supported_versions/0, choose_version/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(VERSIONS, [1, 2]).

-record(state, {sessions = #{} :: #{pid() => pid()}}). % sidecar => session

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
handle_info(Other, State) ->
    %% Anything else is noise or an attack: note it, never crash on it.
    logger:notice("megaphone: listener ignored a message that is no hello: ~P", [Other, 8]),
    {noreply, State}.

hello(Sidecar, Version, Info, #state{sessions = Sessions} = State) ->
    Min = case maps:get(min_version, Info, Version) of
              M when is_integer(M) -> M;
              _ -> Version
          end,
    case {choose_version(Min, Version), maps:find(Sidecar, Sessions)} of
        {error, _} ->
            logger:warning("megaphone: refused sidecar ~p: it speaks versions ~p..~p, we speak ~p",
                           [Sidecar, Min, Version, ?VERSIONS]),
            erlang:send(Sidecar, {megaphone_refused, <<"no common protocol version">>, ?VERSIONS},
                        [noconnect]),
            State;
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
